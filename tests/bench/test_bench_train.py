"""Smoke test of the training benchmark: the --quick sizes run end to end in seconds and
write a results file with every figure the issue asks for. It checks the plumbing, not the
speed: tiny runs on a shared machine say nothing about throughput."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    output = tmp_path / "train.json"
    # A subprocess, as `make bench` runs it: the Trainer's global state stays out of pytest.
    command = ["-m", "bench.train", "--quick", "--repeats", "1", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, *command, "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "useful tok/s" in proc.stdout

    results = json.loads(output.read_text())
    for key in ("device", "timestamp", "model", "dataset", "training", "runs", "goals", "mfu"):
        assert key in results, key
    assert results["device"]["type"] == "cpu"
    assert results["mfu"] is None  # MFU is a GPU figure

    throughput = results["throughput_tokens_per_s"]
    assert set(throughput) == {"recipe", "service", "ideal"}
    assert all(v > 0 for v in throughput.values()), throughput
    assert results["ratios"]["service_over_recipe"] > 0
    assert results["ratios"]["service_over_ideal"] > 0

    losses = results["eval_loss"]
    assert set(losses) == {"recipe", "service"}
    assert all(0 < v < 20 for v in losses.values()), losses
    assert set(results["goals"]) == {
        "service_over_recipe",
        "service_over_ideal",
        "eval_loss_not_worse",
    }
    for name, runs in results["runs"].items():
        assert len(runs) == 1, name
        assert runs[0]["seconds"] > 0

    # The recipe pads every row to the longest: the long tail makes that most of its work.
    assert results["dataset"]["recipe_pad_fraction"] > 0.3
    assert results["dataset"]["max_tokens"] <= results["training"]["max_seq_length"]
