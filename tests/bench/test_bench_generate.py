"""Smoke test of the generation benchmark: the --quick sizes run end to end (a real server in
its own process, adapters trained through it, a training job beside generation) and write a
results file with every figure the issue asks for. It checks the plumbing, not the speed:
tiny runs on a shared machine say nothing about throughput."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    output = tmp_path / "generate.json"
    # A subprocess, as `make bench` runs it: its server, threads and torch state stay out of
    # pytest's process.
    command = ["-m", "bench.generate", "--quick", "--repeats", "1", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, *command, "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "TTFT p50" in proc.stdout

    results = json.loads(output.read_text())
    for key in ("device", "timestamp", "model", "workload", "runs", "goals", "source"):
        assert key in results, key
    assert results["benchmark"] == "generate"
    assert results["device"]["type"] == "cpu"
    levels = [str(c) for c in results["workload"]["concurrency"]]
    assert levels == ["1", "4"]

    throughput = results["throughput_tokens_per_s"]
    assert throughput["seed"] > 0
    for contender in ("service", "ideal"):
        assert set(throughput[contender]) == set(levels), contender
        assert all(v > 0 for v in throughput[contender].values()), throughput
    assert set(results["client_cpu_cores"]) == set(levels)
    # The service ran in its own process, which did the decoding, with the benchmark's
    # torch threads.
    assert set(results["server_cpu_cores"]) == set(levels)
    assert all(v is None or v > 0 for v in results["server_cpu_cores"].values())
    assert results["server"]["torch_threads"] == results["device"]["torch_threads"]
    assert results["other_cpu_cores"]["median"] is None or results["other_cpu_cores"]["median"] >= 0
    for name in ("service_over_seed", "service_over_ideal", "ideal_over_seed"):
        assert all(r > 0 for r in results["ratios"][name].values()), name

    for level in levels:
        latency = results["latency_ms"][level]
        for key in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99"):
            assert latency[key] is not None and latency[key] >= 0, (level, key)
        assert latency["ttft_p99"] >= latency["ttft_p50"]
        runs = results["runs"]["service"][0][level]
        # Every request was answered, with the tokens the server reported.
        assert runs["requests"] == int(level) * results["workload"]["requests_per_client"][level]
        assert runs["tokens"] > 0

    adapters = results["adapters"]
    assert adapters["mixed_tokens_per_s"] > 0 and adapters["same_tokens_per_s"] > 0
    assert adapters["mixed_over_same"] > 0

    overhead = results["grpc_overhead"]
    assert overhead["grpc_ms"] > 0 and overhead["in_process_ms"] > 0
    # Both paths generated the same number of tokens: the same work, timed two ways.
    assert len(results["runs"]["grpc_overhead"][0]["generated_tokens"]) == 1

    co = results["co_serving"]
    assert co["latency_p50_idle_ms"] > 0 and co["latency_p50_training_ms"] > 0
    assert co["train_steps_per_s_alone"] > 0

    assert set(results["goals"]) == {
        "service_over_seed_at_4",
        "service_over_ideal_at_4",
        "mixed_over_same_at_4",
        "grpc_overhead",
    }
    assert all(isinstance(g["met"], bool) for g in results["goals"].values())
    streaming = results["streaming"]
    assert streaming["stream_interval_ms"] == results["server"]["stream_interval_ms"] > 0
    assert streaming["paced_tokens_per_s"] > 0 and streaming["per_token_tokens_per_s"] > 0
    assert streaming["paced_over_per_token"] > 0
    # Either way a message brings at least one token (per token, a client that falls behind
    # still gets what queued up in one message, so no upper bound holds on a busy machine).
    assert streaming["per_token"]["tokens_per_message"] >= 1.0
    assert streaming["paced"]["tokens_per_message"] >= 1.0
    for name in ("service", "ideal", "seed", "mixed", "same", "co_serving", "per_token"):
        assert len(results["runs"][name]) == 1, name


def test_service_process_gets_the_benchmark_configuration(tmp_path: Path) -> None:
    """The flags the benchmark starts `tuneserve serve` with build the very configuration
    it recorded and compared against."""
    from bench.generate import QUICK, parse_args, serve_flags, server_config
    from tuneserve.config import config_from_flags

    config = server_config(QUICK, parse_args(["--quick"]), tmp_path / "model", tmp_path / "data")
    assert config_from_flags(serve_flags(config), env={}) == config
