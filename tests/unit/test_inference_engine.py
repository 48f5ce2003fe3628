"""tuneserve.inference.engine and .remote_engine (the same engine in a worker process):
pinning adapters (LoadAdapter), the import check (ImportAdapter refuses what a load would
refuse), and for the worker, the same generations, slots freed by callers that leave, and
requests in flight failed as UNAVAILABLE when the worker dies."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tuneserve.config import ServerConfig
from tuneserve.errors import FailedPrecondition, Unavailable
from tuneserve.inference.engine import Engine
from tuneserve.inference.params import GenerationRequest, SamplingParams
from tuneserve.inference.remote_engine import RemoteEngine, WorkerLost
from tuneserve.registry import AdapterRegistry

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def engine_config(base: Path, tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        base_model=str(base),
        data_dir=tmp_path / "data",
        device="cpu",
        dtype="float32",
        max_loaded_adapters=1,
        adapter_import_roots=(tmp_path / "imports",),
    )


@pytest.fixture()
def registry(tiny_gpt2: Path, tmp_path: Path, add_adapter: Any) -> AdapterRegistry:
    """Adapters "p" and "q" on the tiny GPT-2."""
    registry = AdapterRegistry(tmp_path / "adapters")
    add_adapter(registry, tiny_gpt2, "p", seed=1)
    add_adapter(registry, tiny_gpt2, "q", seed=2)
    return registry


@pytest.fixture(params=[Engine, RemoteEngine])
def engine(
    request: pytest.FixtureRequest, tiny_gpt2: Path, tmp_path: Path, registry: AdapterRegistry
) -> Iterator[Engine]:
    """An engine over the tiny GPT-2 with one adapter slot, in this process or a worker."""
    engine = request.param(config=engine_config(tiny_gpt2, tmp_path), registry=registry)
    engine.load()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture()
def remote(tiny_gpt2: Path, tmp_path: Path, registry: AdapterRegistry) -> Iterator[RemoteEngine]:
    engine = RemoteEngine(config=engine_config(tiny_gpt2, tmp_path), registry=registry)
    engine.load()
    try:
        yield engine
    finally:
        engine.stop()


def greedy(prompt: str, adapter_id: str = "", tokens: int = 12) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=tokens, greedy=True)
    return GenerationRequest(prompt=prompt, adapter_id=adapter_id, params=params)


def text(engine: Engine | RemoteEngine, request: GenerationRequest) -> str:
    return "".join(c.text for c in engine.generate(request, is_cancelled=lambda: False))


def wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_load_adapter_with_pin_loads_and_pins_it(engine: Engine) -> None:
    state = engine.load_adapter("p", pin=True)
    assert state.loaded == ["p"]
    assert state.pinned == {"p"}
    state = engine.load_adapter("p", pin=False)
    assert state.pinned == set()


def test_a_refused_pin_is_not_recorded(engine: Engine) -> None:
    engine.load_adapter("p", pin=True)
    with pytest.raises(FailedPrecondition):
        engine.load_adapter("q", pin=True)  # the one slot is pinned
    state = engine.adapter_state()
    assert state.loaded == ["p"]
    assert state.pinned == {"p"}


@pytest.mark.parametrize("flaw", ["nan", "rank 0"])
def test_import_refuses_what_a_load_would_refuse(engine: Engine, tmp_path: Path, flaw: str) -> None:
    """Import runs the load's own check: an adapter whose shapes fit but that no Generate
    could load (NaN matrices, rank 0) is refused on `path` and never registered."""
    source = engine._registry.path("p")
    target = tmp_path / "imports" / "flawed"
    target.mkdir(parents=True)
    (target / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(str(source / "adapter_model.safetensors"))
    for key, tensor in tensors.items():
        if flaw == "nan":
            tensors[key] = torch.full_like(tensor, float("nan"))
        else:  # A [0, in], B [out, 0]
            tensors[key] = tensor[:0] if ".lora_A." in key else tensor[:, :0]
    save_file(tensors, str(target / "adapter_model.safetensors"))
    with pytest.raises(FailedPrecondition) as exc:
        engine.import_adapter(str(target), "flawed")
    assert exc.value.field == "path"
    assert not engine._registry.exists("flawed")


def test_the_worker_generates_what_the_engine_generates(
    remote: RemoteEngine, tiny_gpt2: Path, tmp_path: Path, registry: AdapterRegistry
) -> None:
    local = Engine(config=engine_config(tiny_gpt2, tmp_path), registry=registry)
    local.load()
    try:
        for request in (greedy("Hello there"), greedy("Hello there", "p"), greedy("Why", "q")):
            assert text(remote, request) == text(local, request)
    finally:
        local.stop()
    assert text(remote, greedy("Hello there", "p")) != text(remote, greedy("Hello there"))


def test_a_caller_that_leaves_frees_its_slot_in_the_worker(remote: RemoteEngine) -> None:
    chunks = remote.generate(greedy("hi", tokens=480), is_cancelled=lambda: False)
    next(chunks)
    assert remote.busy
    chunks.close()  # the consumer stops early
    wait_until(lambda: not remote.busy and remote.stats.running == 0)
    assert text(remote, greedy("hi", tokens=3))


def test_a_dead_worker_fails_requests_in_flight_and_refuses_new_ones(
    remote: RemoteEngine,
) -> None:
    lost = threading.Event()
    remote.on_lost(lost.set)
    chunks = remote.generate(greedy("hi", tokens=480), is_cancelled=lambda: False)
    next(chunks)
    assert remote.pid is not None
    os.kill(remote.pid, signal.SIGKILL)
    with pytest.raises(WorkerLost):
        list(chunks)
    assert lost.wait(10)
    assert not remote.ready
    with pytest.raises(Unavailable):
        text(remote, greedy("hi"))
    with pytest.raises(Unavailable):
        remote.adapter_state()


def test_a_worker_that_cannot_load_the_model_says_why(
    tiny_gpt2: Path, tmp_path: Path, registry: AdapterRegistry
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gpt2, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    engine = RemoteEngine(config=engine_config(broken, tmp_path), registry=registry)
    with pytest.raises(Exception, match=r"safetensors|header|deserializ") as e:
        engine.load()
    assert not isinstance(e.value, AssertionError)
    assert not engine.ready
    engine.stop()
