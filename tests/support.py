"""Helpers for tests: the demo dataset, configurations and a real server on a thread."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tuneserve_client import TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
VADER = ROOT / "examples" / "vader.jsonl"


def vader_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in VADER.read_text().splitlines() if line.strip()]


class ServerThread:
    """A real server (tuneserve.app.RunningServer) on its own event loop thread, bound to
    port 0 on loopback, so tests talk to it over a real channel with the real client."""

    def __init__(self, config: object, *, load: bool = True) -> None:
        from tuneserve.app import RunningServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = self._run(RunningServer.start(config))  # type: ignore[arg-type]
        self.target = f"127.0.0.1:{self.running.port}"
        if load:
            self.load()

    def load(self) -> None:
        self._run(self.running.load())

    def stop(self) -> None:
        self._run(self.running.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(300)  # type: ignore[arg-type]


def write_tls_files(directory: Path) -> dict[str, Path]:
    """PEM files under `directory`: a CA ("ca"), a server certificate for localhost and
    127.0.0.1 signed by it ("server_cert", "server_key"), a client certificate signed by it
    ("client_cert", "client_key") and one signed by another CA ("stranger_cert", ...)."""
    import trustme

    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client@example.com")
    stranger = other_ca.issue_cert("stranger@example.com")
    blobs = {
        "ca": ca.cert_pem.bytes(),
        "server_cert": b"".join(b.bytes() for b in server.cert_chain_pems),
        "server_key": server.private_key_pem.bytes(),
        "client_cert": client.cert_chain_pems[0].bytes(),
        "client_key": client.private_key_pem.bytes(),
        "stranger_cert": stranger.cert_chain_pems[0].bytes(),
        "stranger_key": stranger.private_key_pem.bytes(),
    }
    paths = {name: directory / f"{name}.pem" for name in blobs}
    for name, blob in blobs.items():
        paths[name].write_bytes(blob)
    return paths


def make_config(base_model: Path, data_dir: Path, **overrides: object) -> object:
    from tuneserve.config import ServerConfig

    return ServerConfig(
        base_model=str(base_model),
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        data_dir=data_dir,
        grace_period_s=2.0,
        **overrides,  # type: ignore[arg-type]
    ).validate()


BIN = Path(sys.executable).parent / "tuneserve"


class ServerProcess:
    def __init__(
        self, model: Path, data: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self._spawn(model, data, *extra, env=env)
        self.client = TuneserveClient(self.target)
        self.client.wait_ready(timeout=120)

    def _spawn(
        self, model: Path, data: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        """Start `tuneserve serve` and wait until it reports its port (not until SERVING);
        `env`: variables added to this process's environment."""
        self.proc = subprocess.Popen(
            [
                str(BIN),
                "serve",
                "--base-model",
                str(model),
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
                str(data),
                "--grace-period-s",
                "10",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env} if env else None,
        )
        self.lines: list[str] = []
        self.metrics_port: int | None = None
        self._port = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self._port.wait(120), "server did not report its port:\n" + "".join(self.lines)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r"metrics on (\d+)", line):
                self.metrics_port = int(m.group(1))  # /metrics over HTTP on 127.0.0.1
            if m := re.search(r"listening on port (\d+)", line):
                self.target = f"127.0.0.1:{m.group(1)}"
                self._port.set()

    def stop(self, sig: int) -> int:
        self.client.close()
        self.proc.send_signal(sig)
        return self.proc.wait(60)


def wait_running(client: TuneserveClient, job_id: str) -> pb.Job:
    deadline = time.monotonic() + 60
    while (job := client.get_status(job_id)).progress.step < 1:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def greedy_reference(model: Any, prompt_ids: list[int], n: int) -> list[int]:
    """The reference for batched decoding: greedy tokens of one prompt from a plain
    past_key_values loop, outside any scheduler or batch."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        while len(tokens) < n:
            out = model(
                input_ids=torch.tensor([[tokens[-1]]]),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def adapter_files(data_dir: Path, adapter_id: str) -> Path:
    """The directory holding an adapter's files in a server's embedded artifact store
    (data_dir/artifacts/adapters/<id>/<version>): its one current version."""
    versions = [
        p for p in (data_dir / "artifacts" / "adapters" / adapter_id).iterdir() if p.is_dir()
    ]
    assert len(versions) == 1, versions
    return versions[0]
