"""Smoke test of the scale-out benchmark: the --quick sizes run end to end (a real PostgreSQL,
an S3 server over HTTP, real `tuneserve serve` replicas, claim workers in their own
processes) and write a results file with every figure the issue asks for. It checks the
plumbing, not the speed: tiny runs on a shared machine say nothing about throughput."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres import ALLOW_MISSING, find_bindir

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # 1.5-2.5 minutes on two cores: replicas start four times


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    if find_bindir() is None:
        message = "PostgreSQL's server binaries were not found: run `make postgresql`"
        if os.environ.get(ALLOW_MISSING):
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    output = tmp_path / "scale.json"
    # A subprocess, as `make bench` runs it: its servers and workers stay out of pytest.
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "hit rate" in proc.stdout

    results = json.loads(output.read_text())
    for key in ("device", "timestamp", "source", "model", "workload", "runs"):
        assert key in results, key
    assert results["benchmark"] == "scale"
    assert results["quick"] is True

    # 1. Claims: every worker count on both stores, every job claimed exactly once.
    workers = [str(w) for w in results["workload"]["claims"]["workers"]]
    assert workers == ["1", "2", "4", "8"]
    for store in ("postgresql", "sqlite"):
        assert set(results["claims_per_s"][store]) == set(workers), store
        assert all(v > 0 for v in results["claims_per_s"][store].values()), store
        for w in workers:
            for run in results["runs"]["claims"][store][w]:
                assert run["exactly_once"], (store, w, run)
                assert run["succeeded"] == run["jobs"] and run["left"] == 0
                assert len(run["claims_per_worker"]) == int(w)
    assert results["claims_exactly_once"] is True

    # 2. Cold load: both stores measured on every adapter; a cold request includes the load.
    cold = results["runs"]["cold_load"]
    for kind in ("s3", "local"):
        assert len(cold[kind]["cold_ms"]) == len(cold[kind]["warm_ms"]) == cold["adapters"]
        assert results["cold_load_ms"][kind]["cold_ms_p50"] > 0
        assert results["cold_load_ms"][kind]["warm_ms_p50"] > 0
        # Every adapter was loaded once, the warm-up one included: warm requests hit.
        assert cold[kind]["adapter_loads"] == cold["adapters"] + 1
    assert results["s3_over_local_cold"] > 0

    # 3. Routing: both policies, every request answered, hit rates from the replicas' metrics.
    requests = results["workload"]["routing"]["requests"]
    adapters = results["workload"]["routing"]["adapters"]
    for policy in ("affinity", "round_robin"):
        summary = results["routing"][policy]
        assert summary["failures"] == 0, results["runs"]["routing"][policy]
        assert 0 <= summary["hit_rate"] < 1
        assert 0 < summary["latency_ms_p50"] <= summary["latency_ms_p95"]
        assert summary["throughput_rps"] > 0
        for run in results["runs"]["routing"][policy]:
            assert run["requests"] == run["server_requests"] == requests
            assert len(run["per_replica"]) == 3
            # A replica pulls each adapter it serves from S3 once, and loads it at least once.
            assert 1 <= run["s3_pulls"] <= min(run["adapter_loads"], 3 * adapters)
    # Round-robin spreads requests over every replica.
    for run in results["runs"]["routing"]["round_robin"]:
        assert all(r["requests"] > 0 for r in run["per_replica"])
    assert set(results["affinity_over_round_robin"]) == {
        "hit_rate_points",
        "latency_p50",
        "latency_p95",
        "throughput",
        "requests_per_cpu_s",
    }
