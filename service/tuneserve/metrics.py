"""Every Prometheus metric the service exports, in one place, on its own registry.

The core does not import this module: it reports plain events (job progress and states,
generation outcomes) through small hooks, and this module turns them into series. GPU
figures are read from NVML when Prometheus scrapes (`GpuCollector`), as DCGM exporter does.
Names follow Prometheus conventions: prefix `tuneserve_`, base units, `_total` counters;
RPC series use the go-grpc-prometheus names. No label takes unbounded values (no job,
request or adapter ids)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
JOB_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600, 86400)
JOB_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
GENERATION_OUTCOMES = ("EOS", "LENGTH", "STOP_SEQUENCE", "CANCELLED", "ERROR")


class Metrics:
    """Thread-safe (prometheus-client's metrics are)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # --- RPCs (go-grpc-prometheus names)
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self.rpc_started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", rpc, registry=r
        )
        self.rpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            (*rpc, "grpc_code"),
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its end (a stream's last message).",
            rpc,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # --- training
        self.train_steps = Counter(
            "tuneserve_training_steps_total", "Optimizer steps taken.", registry=r
        )
        self.train_tokens = Counter(
            "tuneserve_training_tokens_total", "Non-pad tokens trained on.", registry=r
        )
        self.train_loss = Gauge(
            "tuneserve_training_loss",
            "Training loss of the last step of the running job.",
            registry=r,
        )
        self.train_tokens_per_second = Gauge(
            "tuneserve_training_tokens_per_second",
            "Tokens per second of the running job.",
            registry=r,
        )
        self.job_seconds = Histogram(
            "tuneserve_job_duration_seconds",
            "Time from a job's start to its end, by final state.",
            ("state",),
            buckets=JOB_BUCKETS,
            registry=r,
        )
        # --- generation
        self.gen_requests = Counter(
            "tuneserve_generation_requests_total",
            "Generation requests finished, by outcome.",
            ("outcome",),
            registry=r,
        )
        self.gen_ttft = Histogram(
            "tuneserve_generation_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gen_itl = Histogram(
            "tuneserve_generation_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.gen_seconds = Histogram(
            "tuneserve_generation_request_duration_seconds",
            "Time from a request's arrival to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gen_prompt_tokens = Counter(
            "tuneserve_generation_prompt_tokens_total", "Prompt tokens processed.", registry=r
        )
        self.gen_tokens = Counter(
            "tuneserve_generation_generated_tokens_total", "Tokens generated.", registry=r
        )
        for outcome in GENERATION_OUTCOMES:
            self.gen_requests.labels(outcome=outcome)

    # --- events from the core (the observers jobs/ and inference/ call)

    def job_progress(
        self, *, steps: int, tokens: int, loss: float, tokens_per_second: float
    ) -> None:
        self.train_steps.inc(steps)
        self.train_tokens.inc(tokens)
        self.train_loss.set(loss)
        self.train_tokens_per_second.set(tokens_per_second)

    def job_finished(self, *, state: str, seconds: float) -> None:
        self.job_seconds.labels(state=state).observe(seconds)
        self.train_tokens_per_second.set(0)

    def first_token(self, seconds: float) -> None:
        self.gen_ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.gen_itl.observe(seconds)

    def generation_finished(
        self, *, outcome: str, seconds: float, prompt_tokens: int, generated_tokens: int
    ) -> None:
        self.gen_requests.labels(outcome=outcome).inc()
        self.gen_seconds.observe(seconds)
        self.gen_prompt_tokens.inc(prompt_tokens)
        self.gen_tokens.inc(generated_tokens)

    def watch_jobs(self, counts: Callable[[], dict[str, int]]) -> None:
        """tuneserve_jobs{state} and tuneserve_job_queue_length, counted at scrape time."""
        self.registry.register(_JobsCollector(counts))

    def watch(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read when Prometheus scrapes (queue depths, batch size, adapters)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def watch_counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A counter kept by the core, read when Prometheus scrapes (exposed as name_total)."""
        self.registry.register(_ReadCounter(name, documentation, read))

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def serve(self, address: str) -> tuple[Any, int]:
        """Start /metrics over HTTP on its own port (0 picks one); returns (server, port)."""
        host, _, port = address.rpartition(":")
        server, thread = start_http_server(int(port), addr=host, registry=self.registry)
        return (server, thread), int(server.server_port)


class _ReadCounter(Collector):
    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._doc, self._read = name, documentation, read

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(self._name, self._doc, value=self._read())


class _JobsCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Any]:
        try:
            counts = self._counts()
        except Exception as e:
            # The shared job store unreachable: the rest of /metrics (the GPUs, generation)
            # still scrapes; these series are absent until it is back.
            log.warning("job counts left out of this scrape: %s", e)
            return
        jobs = GaugeMetricFamily("tuneserve_jobs", "Jobs by state.", labels=("state",))
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        queue = GaugeMetricFamily("tuneserve_job_queue_length", "Jobs waiting to run.")
        queue.add_metric([], counts.get("QUEUED", 0))
        yield queue


class GpuCollector(Collector):
    """Per-GPU figures from NVML at scrape time, labelled gpu, uuid and name, plus the
    process's torch allocator figures. NVML is initialised once; without a GPU (or without
    NVML) the collector reports `tuneserve_gpu_count 0` and nothing else, quietly."""

    def __init__(
        self,
        nvml: Any | None = None,
        torch_memory: Callable[[], list[tuple[str, int, int]]] | None = None,
    ) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._ready: bool | None = None
        self._torch_memory = torch_memory or (lambda: [])

    def _init(self) -> bool:
        with self._lock:
            if self._ready is None:
                try:
                    if self._nvml is None:
                        import pynvml  # nvidia-ml-py

                        self._nvml = pynvml
                    self._nvml.nvmlInit()
                    self._ready = True
                except Exception as e:  # no driver, no library: say so once, not per scrape
                    log.info("NVML not available (%s); GPU metrics report 0 GPUs", e)
                    self._ready = False
            return self._ready

    def collect(self) -> Iterator[Any]:
        count = GaugeMetricFamily("tuneserve_gpu_count", "GPUs visible through NVML.")
        labels = ("gpu", "uuid", "name")
        families: dict[str, Any] = {
            "util": GaugeMetricFamily(
                "tuneserve_gpu_utilization_ratio",
                "GPU busy time over the last sample, 0-1.",
                labels=labels,
            ),
            "used": GaugeMetricFamily(
                "tuneserve_gpu_memory_used_bytes", "GPU memory in use.", labels=labels
            ),
            "total": GaugeMetricFamily(
                "tuneserve_gpu_memory_total_bytes", "GPU memory in all.", labels=labels
            ),
            "power": GaugeMetricFamily(
                "tuneserve_gpu_power_watts", "GPU power draw.", labels=labels
            ),
            "energy": CounterMetricFamily(
                "tuneserve_gpu_energy_joules",
                "GPU energy since the driver loaded.",
                labels=labels,
            ),
            "temp": GaugeMetricFamily(
                "tuneserve_gpu_temperature_celsius", "GPU temperature.", labels=labels
            ),
            "clock": GaugeMetricFamily(
                "tuneserve_gpu_sm_clock_hertz",
                "GPU streaming-multiprocessor clock.",
                labels=labels,
            ),
        }
        n = 0
        if self._init():
            nv: Any = self._nvml
            try:
                n = nv.nvmlDeviceGetCount()
                for i in range(n):
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    key = [str(i), _text(nv.nvmlDeviceGetUUID(h)), _text(nv.nvmlDeviceGetName(h))]
                    memory = nv.nvmlDeviceGetMemoryInfo(h)
                    families["util"].add_metric(key, nv.nvmlDeviceGetUtilizationRates(h).gpu / 100)
                    families["used"].add_metric(key, memory.used)
                    families["total"].add_metric(key, memory.total)
                    families["power"].add_metric(key, nv.nvmlDeviceGetPowerUsage(h) / 1000)
                    families["energy"].add_metric(
                        key, nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000
                    )
                    families["temp"].add_metric(
                        key, nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                    )
                    families["clock"].add_metric(
                        key, nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM) * 1e6
                    )
            except Exception:  # a GPU that vanished mid-scrape: report what was read
                log.debug("NVML read failed", exc_info=True)
        count.add_metric([], n)
        yield count
        yield from families.values()
        allocated = GaugeMetricFamily(
            "tuneserve_torch_memory_allocated_bytes",
            "Memory torch has allocated.",
            labels=("device",),
        )
        reserved = GaugeMetricFamily(
            "tuneserve_torch_memory_reserved_bytes",
            "Memory torch's allocator holds.",
            labels=("device",),
        )
        for device, used, held in self._torch_memory():
            allocated.add_metric([device], used)
            reserved.add_metric([device], held)
        yield allocated
        yield reserved


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
