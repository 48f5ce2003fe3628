"""tuneserve.metrics: the GPU collector against a fake NVML, and the series' shapes."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tuneserve.logs import JsonFormatter, _ContextFilter, job_id_var, request_id_var
from tuneserve.metrics import GpuCollector, Metrics


class FakeNvml:
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, gpus: int = 2, fail_init: bool = False) -> None:
        self.gpus, self.fail_init, self.inits = gpus, fail_init, 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-{h}".encode()

    def nvmlDeviceGetName(self, h: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=(h + 1) * 1024, total=80 * 1024)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=50 + h)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 300_000  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        return 5_000_000  # mJ

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 60

    def nvmlDeviceGetClockInfo(self, h: int, clock: int) -> int:
        return 1980  # MHz


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_gpu_series_per_device_in_base_units() -> None:
    metrics = Metrics()
    metrics.add_collector(GpuCollector(nvml=FakeNvml(), torch_memory=lambda: [("cuda:0", 7, 9)]))
    s = scrape(metrics)
    gpu1 = (("gpu", "1"), ("name", "NVIDIA H100 80GB HBM3"), ("uuid", "GPU-1"))
    assert s[("tuneserve_gpu_count", ())] == 2
    assert s[("tuneserve_gpu_utilization_ratio", gpu1)] == 0.51
    assert s[("tuneserve_gpu_memory_used_bytes", gpu1)] == 2048
    assert s[("tuneserve_gpu_memory_total_bytes", gpu1)] == 80 * 1024
    assert s[("tuneserve_gpu_power_watts", gpu1)] == 300
    assert s[("tuneserve_gpu_energy_joules_total", gpu1)] == 5000
    assert s[("tuneserve_gpu_temperature_celsius", gpu1)] == 60
    assert s[("tuneserve_gpu_sm_clock_hertz", gpu1)] == 1.98e9
    assert s[("tuneserve_torch_memory_allocated_bytes", (("device", "cuda:0"),))] == 7
    assert s[("tuneserve_torch_memory_reserved_bytes", (("device", "cuda:0"),))] == 9


def test_without_nvml_the_endpoint_says_zero_gpus_and_initialises_once(caplog: Any) -> None:
    nvml = FakeNvml(fail_init=True)
    metrics = Metrics()
    with caplog.at_level(logging.DEBUG, logger="tuneserve.metrics"):
        metrics.add_collector(GpuCollector(nvml=nvml))
        for _ in range(3):
            assert scrape(metrics)[("tuneserve_gpu_count", ())] == 0
    assert nvml.inits == 1  # not retried at every scrape
    assert len([r for r in caplog.records if r.levelno >= logging.INFO]) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_read_counters_and_job_states_are_exposed_with_their_types() -> None:
    metrics = Metrics()
    metrics.watch_counter("tuneserve_adapter_loads", "loads", lambda: 4)
    metrics.watch_jobs(lambda: {"QUEUED": 2, "RUNNING": 1})
    families = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
    }
    assert families["tuneserve_adapter_loads"].type == "counter"
    s = scrape(metrics)
    assert s[("tuneserve_adapter_loads_total", ())] == 4
    assert s[("tuneserve_jobs", (("state", "QUEUED"),))] == 2
    assert s[("tuneserve_jobs", (("state", "FAILED"),))] == 0  # every state, always
    assert s[("tuneserve_job_queue_length", ())] == 2


def test_json_logs_carry_the_request_and_job_ids() -> None:
    record = logging.LogRecord("tuneserve.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    job = job_id_var.set("job-1")
    request = request_id_var.set("req-9")
    try:
        assert _ContextFilter().filter(record)  # what the log handler runs on every record
        entry = json.loads(JsonFormatter().format(record))
    finally:
        job_id_var.reset(job)
        request_id_var.reset(request)
    assert entry["message"] == "hello you" and entry["level"] == "INFO"
    assert entry["job_id"] == "job-1" and entry["request_id"] == "req-9"
