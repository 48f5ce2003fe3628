"""k8s/dashboards: every series the Grafana dashboard queries is one the service exports.

The exported names come from a real `Metrics` registry (plus the scrape-time series the
server registers with `watch_jobs` and `watch`, and `GpuCollector` over a fake one-GPU NVML),
rendered with `generate_latest` and parsed back, so `_bucket`, `_sum`, `_count` and `_total`
appear exactly as Prometheus would store them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tuneserve.app import watch_service
from tuneserve.metrics import GpuCollector, Metrics

DASHBOARDS = Path(__file__).resolve().parents[2] / "k8s" / "dashboards"
DASHBOARD = DASHBOARDS / "tuneserve.json"
KUSTOMIZATION = DASHBOARDS / "kustomization.yaml"


# Series names only: the service's own prefixes. Label names (grpc_method, grpc_code, le,
# state) and PromQL functions or keywords never start with these.
NAME = re.compile(r"(?<![a-zA-Z0-9_:])[a-zA-Z_:][a-zA-Z0-9_:]*")
OURS = ("tuneserve_", "grpc_server_")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


class FakeNvml:
    """The part of pynvml that GpuCollector.collect calls, for one GPU."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return b"GPU-00000000-0000-0000-0000-000000000000"

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=1 << 30, total=80 << 30, free=79 << 30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=42, memory=10)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 250_000  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return 1_000_000  # mJ

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 55

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        return 1980  # MHz


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [
        target["expr"]
        for panel in panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        out.append(query["query"] if isinstance(query, dict) else query)
    return out


def series_names(expr: str) -> set[str]:
    """The service's series an expression names (string literals, e.g. label values, out)."""
    return {name for name in NAME.findall(STRING.sub('""', expr)) if name.startswith(OURS)}


# The series a family of each type is exposed as (prometheus-client's text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def exposed_names() -> set[str]:
    """Every series name the service exposes, wired as `tuneserve.app` wires it. A labelled
    metric has no samples until its first labels are used (the RPC series before the first
    RPC), so each family also contributes the names its type is exposed under."""
    metrics = Metrics()
    # The server's own wiring, over stand-ins for the engine and the job manager.
    engine = SimpleNamespace(
        stats=SimpleNamespace(running=3, waiting=1),
        ready=True,
        adapter_state=lambda: SimpleNamespace(loaded=["a"], loads=2, evictions=1),
    )
    jobs = SimpleNamespace(counts=lambda: {"RUNNING": 1, "QUEUED": 2})
    gpu = GpuCollector(nvml=FakeNvml(), torch_memory=lambda: [("cuda:0", 1 << 20, 1 << 21)])
    watch_service(metrics, engine, jobs, gpu)
    text = generate_latest(metrics.registry).decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_series_names_ignore_functions_labels_and_strings() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_"
        'bucket{job=~"$job", grpc_code!="tuneserve_not_a_series"}[$__rate_interval])))'
    )
    assert series_names(expr) == {"grpc_server_handling_seconds_bucket"}
    assert series_names("sum(tuneserve_jobs) + tuneserve_gpu_count") == {
        "tuneserve_jobs",
        "tuneserve_gpu_count",
    }


def test_exposed_names_include_the_rendered_suffixes() -> None:
    exposed = exposed_names()
    for name in (
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "tuneserve_gpu_energy_joules_total",
        "tuneserve_gpu_utilization_ratio",
        "tuneserve_torch_memory_reserved_bytes",
        "tuneserve_adapter_loads_total",
        "tuneserve_jobs",
        "tuneserve_job_queue_length",
    ):
        assert name in exposed
    assert "tuneserve_not_exported" not in exposed
    assert "tuneserve_gpu_utilization_ratio_total" not in exposed  # a gauge has no _total
    assert "tuneserve_training_steps" not in exposed  # a counter is only seen with _total


def test_every_queried_series_is_exported(dashboard: dict[str, Any]) -> None:
    exprs = expressions(dashboard) + variable_queries(dashboard)
    assert exprs
    used = set().union(*(series_names(e) for e in exprs))
    missing = sorted(used - exposed_names())
    assert not missing, f"dashboard queries series the service does not export: {missing}"


def test_every_panel_queries_something(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        assert exprs and all(series_names(e) for e in exprs), panel["title"]


def test_each_area_has_a_panel(dashboard: dict[str, Any]) -> None:
    exprs = expressions(dashboard)
    for needle in (
        "tuneserve_gpu_utilization_ratio",
        "grpc_server_handled_total",
        "tuneserve_training_",
        "tuneserve_generation_",
    ):
        assert any(needle in e for e in exprs), needle


def test_dashboard_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))


def test_configmap_is_labelled_for_the_grafana_sidecar() -> None:
    text = KUSTOMIZATION.read_text()
    try:
        import yaml
    except ImportError:  # pyyaml is not a declared dependency: fall back to the text
        assert "grafana_dashboard" in text and DASHBOARD.name in text
        return
    kustomization = yaml.safe_load(text)
    options = kustomization["generatorOptions"]
    assert options["labels"]["grafana_dashboard"] == "1"
    assert options["disableNameSuffixHash"] is True
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == "tuneserve-grafana-dashboard"
    assert generator["files"] == [DASHBOARD.name]
