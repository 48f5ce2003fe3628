"""`make demo`: the whole path end to end, offline, in about a minute on a laptop CPU.

Builds a tiny GPT-2-shaped model, starts the server, fine-tunes a LoRA adapter on a small
question/answer dataset (the style of ../shared/seeds article 1) with a progress bar,
prints base and adapter generations for the same prompt, and shuts the server down."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tuneserve_client import TuneserveClient

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
DATASET = ROOT / "examples" / "vader.jsonl"
BIN = Path(sys.executable).parent / "tuneserve"
PROMPTS = ["Question: Who is your father? Answer:", "Question: What is the Force? Answer:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def print_metrics(port: int) -> None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="GenerateStream"',
        'tuneserve_jobs{state="SUCCEEDED"}',
        "tuneserve_training_steps_total ",
        "tuneserve_training_tokens_total ",
        "tuneserve_generation_generated_tokens_total ",
        "tuneserve_generation_time_to_first_token_seconds_count ",
        "tuneserve_gpu_count ",
    )
    for line in text.splitlines():
        if line.startswith(wanted):
            print(line)


def run(*args: str, target: str) -> None:
    print(f"\n$ tuneserve {' '.join(args)}", flush=True)
    subprocess.run([str(BIN), "--target", target, *args], check=True)


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    rows = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]
    (WORK / "corpus.txt").write_text("\n".join(r["prompt"] + r["response"] for r in rows))
    print("== building a tiny GPT-2-shaped model offline", flush=True)
    subprocess.run(
        [
            str(BIN),
            "build-tiny-model",
            str(WORK / "model"),
            "--text-file",
            str(WORK / "corpus.txt"),
        ],
        check=True,
    )

    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    log = (WORK / "server.log").open("w")
    print(f"== starting the server on {target} (log: {WORK / 'server.log'})", flush=True)
    server = subprocess.Popen(
        [
            str(BIN),
            "serve",
            "--base-model",
            str(WORK / "model"),
            "--listen",
            target,
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            "--data-dir",
            str(WORK / "data"),
            "--dataset-roots",
            str(DATASET.parent),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with TuneserveClient(target) as client:
            client.wait_ready(timeout=120)
        print("== server is SERVING; fine-tuning an adapter on", DATASET.name, flush=True)
        run(
            "train",
            "--server-path",
            str(DATASET),
            "--adapter-id",
            "vader",
            "--epochs",
            "30",
            "--learning-rate",
            "0.01",
            "--batch-size",
            "4",
            "--lora-r",
            "16",
            "--wait",
            target=target,
        )
        run("adapters", target=target)
        for prompt in PROMPTS:
            print(f"\n== {prompt!r}: base model, then the adapter (greedy)", flush=True)
            run("generate", prompt, "--greedy", "--max-new-tokens", "24", target=target)
            run(
                "generate",
                prompt,
                "--adapter",
                "vader",
                "--greedy",
                "--max-new-tokens",
                "24",
                target=target,
            )
        print(f"\n== a few series from http://127.0.0.1:{metrics_port}/metrics", flush=True)
        print_metrics(metrics_port)
    finally:
        print("\n== stopping the server (SIGTERM)", flush=True)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"server exited with code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
