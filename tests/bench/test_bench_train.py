"""Smoke test of the training benchmark: the --quick sizes run end to end in seconds (a
real `tuneserve serve` among the contenders) and write a results file with every figure the
issue asks for. It checks the plumbing, not the speed: tiny runs on a shared machine say
nothing about throughput."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTENDERS = {"seed", "hf-grouped", "hf-flatten", "in-process", "packed", "server", "ideal"}
GOALS = {"server_over_in_process", "server_over_best_hf", "eval_loss_not_worse"}
LONG_TAIL_GOALS = {"server_over_ideal", "server_over_seed"}  # the Pareto set's only


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    output = tmp_path / "train.json"
    # A subprocess, as `make bench` runs it: the Trainer's global state stays out of pytest.
    command = ["-m", "bench.train", "--quick", "--repeats", "1", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, *command, "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "useful tok/s" in proc.stdout

    results = json.loads(output.read_text())
    for key in ("device", "timestamp", "source", "dtype", "datasets", "all_goals_met"):
        assert key in results, key
    assert results["device"]["type"] == "cpu"
    assert set(results["datasets"]) == {"fixture", "pareto"}
    for name, report in results["datasets"].items():
        assert report["mfu"] is None  # MFU is a GPU figure
        throughput = report["throughput_tokens_per_s"]
        assert set(throughput) == CONTENDERS, name
        assert all(v > 0 for v in throughput.values()), (name, throughput)
        assert all(v > 0 for v in report["ratios"].values()), (name, report["ratios"])
        losses = report["eval_loss"]
        assert set(losses) == CONTENDERS - {"ideal"}
        assert all(0 < v < 20 for v in losses.values()), (name, losses)
        # The same recipe and seed in the server and in-process: the same adapter.
        assert abs(losses["server"] - losses["in-process"]) < 1e-3
        expected = GOALS | LONG_TAIL_GOALS if name == "pareto" else GOALS
        assert set(report["goals"]) == expected, name
        for contender, runs in report["runs"].items():
            assert len(runs) == 1, (name, contender)
            assert runs[0]["seconds"] > 0
        server = report["runs"]["server"][0]
        assert 0 < server["server_seconds"] <= server["seconds"]
        # The seed recipe pads every row to the longest: the long tail makes that most of
        # its work.
        assert report["dataset"]["seed_pad_fraction"] > 0.3
    pareto = results["datasets"]["pareto"]["dataset"]
    assert pareto["lengths"]["kind"] == "pareto"
    assert pareto["p99_tokens_uncut"] > pareto["median_tokens"] * 3  # a long tail
