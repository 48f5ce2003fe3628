"""Helpers for tests: the demo dataset, configurations and a real server on a thread."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

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


def make_config(base_model: Path, data_dir: Path, **overrides: object) -> object:
    from tuneserve.config import ServerConfig

    return ServerConfig(
        base_model=str(base_model),
        listen="127.0.0.1:0",
        data_dir=data_dir,
        grace_period_s=2.0,
        **overrides,  # type: ignore[arg-type]
    ).validate()
