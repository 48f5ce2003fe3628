"""The `tuneserve` command against a real server: what a user types, what they see."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import BIN, VADER, make_config

pytestmark = pytest.mark.e2e


def run(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), "--target", target, *args], capture_output=True, text=True, timeout=300
    )


def test_cli_trains_with_progress_and_shows_everything(
    tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    target = server_factory(make_config(tiny_gpt2, tmp_path)).target
    train = run(
        target,
        "train",
        "--data",
        str(VADER),
        "--adapter-id",
        "cli",
        "--epochs",
        "4",
        "--learning-rate",
        "0.01",
        "--batch-size",
        "4",
        "--eval-fraction",
        "0.25",
        "--scheduler",
        "cosine",
        "--wait",
    )
    assert train.returncode == 0, train.stderr
    assert "step/s" in train.stderr and "100%" in train.stderr  # the progress bar
    assert "SUCCEEDED" in train.stdout and "eval loss" in train.stdout
    assert "sample:" in train.stdout  # a held-out prompt and what the adapter said
    job_id = train.stdout.split()[1]

    curve = run(target, "curve", job_id)
    assert curve.returncode == 0 and len(curve.stdout.splitlines()) == 1 + 12

    status = run(target, "status", job_id, "--json")
    assert json.loads(status.stdout)["state"] == "JOB_STATE_SUCCEEDED"
    assert job_id in run(target, "jobs", "--state", "SUCCEEDED").stdout
    assert "cli" in run(target, "adapters").stdout

    generate = run(
        target,
        "generate",
        "Question: Who is your father? Answer:",
        "--adapter",
        "cli",
        "--max-new-tokens",
        "5",
        "--seed",
        "3",
    )
    assert generate.returncode == 0 and "seed 3" in generate.stderr

    missing = run(target, "generate", "hi", "--adapter", "nope")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "only a prompt"}\n')
    rejected = run(target, "train", "--data", str(bad))
    assert rejected.returncode == 1
    assert "INVALID_ARGUMENT" in rejected.stderr and "rows[1].response" in rejected.stderr

    rows = tmp_path / "labelled.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"text": f"{w} {i}", "label": "pos" if w == "good" else "neg"}) + "\n"
            for i in range(6)
            for w in ("good", "bad")
        )
    )
    cls = run(
        target,
        "train",
        "--data",
        str(rows),
        "--classify",
        "--adapter-id",
        "cls",
        "--epochs",
        "3",
        "--wait",
    )
    assert cls.returncode == 0, cls.stderr
    out = run(target, "classify", "cls", "good 1", "bad 1")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2
    assert "pos=" in out.stdout and "neg=" in out.stdout
