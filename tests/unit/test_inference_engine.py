"""tuneserve.inference.engine: pinning adapters through the engine (LoadAdapter)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tuneserve.config import ServerConfig
from tuneserve.errors import FailedPrecondition
from tuneserve.inference.engine import Engine
from tuneserve.registry import AdapterRegistry


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The model is tiny: one thread is fastest, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def engine(tiny_gpt2: Path, tmp_path: Path, add_adapter: Any) -> Iterator[Engine]:
    """An engine over the tiny GPT-2 with one adapter slot and adapters "p" and "q"."""
    registry = AdapterRegistry(tmp_path / "adapters")
    add_adapter(registry, tiny_gpt2, "p", seed=1)
    add_adapter(registry, tiny_gpt2, "q", seed=2)
    config = ServerConfig(
        base_model=str(tiny_gpt2),
        data_dir=tmp_path / "data",
        device="cpu",
        dtype="float32",
        max_loaded_adapters=1,
    )
    engine = Engine(config=config, registry=registry)
    engine.load()
    try:
        yield engine
    finally:
        engine.stop()


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
