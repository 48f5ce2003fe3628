"""Shared fixtures: tiny offline models and real servers on port 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess, ServerThread, vader_rows
from tuneserve.logs import quiet_libraries

quiet_libraries()


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tuneserve.tiny_models import build_tiny_model

    text = [r["prompt"] + r["response"] for r in vader_rows()]
    return build_tiny_model(tmp_path_factory.mktemp("gpt2"), architecture="gpt2", extra_text=text)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tuneserve.tiny_models import build_tiny_model

    text = [r["prompt"] + r["response"] for r in vader_rows()]
    return build_tiny_model(tmp_path_factory.mktemp("llama"), architecture="llama", extra_text=text)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerThread]]:
    """Start servers with `factory(config)`; all are stopped at the end of the test."""
    started: list[ServerThread] = []

    def factory(config: object, *, load: bool = True) -> ServerThread:
        server = ServerThread(config, load=load)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.thread.is_alive():
            server.stop()


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
