"""tuneserve.inference.engine: pinning adapters through the engine (LoadAdapter), and the
import check (ImportAdapter refuses what a load would refuse)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3NextConfig

from tuneserve.config import ServerConfig
from tuneserve.errors import FailedPrecondition
from tuneserve.inference import engine as engine_module
from tuneserve.inference.classifier import Classifier
from tuneserve.inference.engine import Engine
from tuneserve.registry import local_registry
from tuneserve.tiny_models import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_config(tiny_gpt2: Path, tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        base_model=str(tiny_gpt2),
        data_dir=tmp_path / "data",
        device="cpu",
        dtype="float32",
        max_loaded_adapters=1,
        adapter_import_roots=(tmp_path / "imports",),
    )


@pytest.fixture()
def engine(tiny_gpt2: Path, tmp_path: Path, add_adapter: Any) -> Iterator[Engine]:
    """An engine over the tiny GPT-2 with one adapter slot and adapters "p" and "q"."""
    registry = local_registry(tmp_path / "adapters")
    add_adapter(registry, tiny_gpt2, "p", seed=1)
    add_adapter(registry, tiny_gpt2, "q", seed=2)
    engine = Engine(config=make_config(tiny_gpt2, tmp_path), registry=registry)
    engine.load()
    try:
        yield engine
    finally:
        engine.stop()


def test_loading_and_classifying_run_on_threads_that_end(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Torch work beside the decode loop leaves no OpenMP team on a long-lived thread
    (tuneserve.torch_threads): the model loads, and classifies, on threads of their own."""
    threads: list[threading.Thread] = []
    real_load = engine_module.load_model

    def load_model(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real_load(*args, **kwargs)

    def classify(self: Classifier, *args: Any, **kwargs: Any) -> list[Any]:
        threads.append(threading.current_thread())
        return []

    monkeypatch.setattr(engine_module, "load_model", load_model)
    monkeypatch.setattr(Classifier, "classify", classify)
    engine = Engine(
        config=make_config(tiny_gpt2, tmp_path), registry=local_registry(tmp_path / "adapters")
    )
    engine.load()
    try:
        assert engine.classify("c", ["a text"]) == []
    finally:
        engine.stop()
    assert [t.name for t in threads] == ["model-load", "classify"]
    assert not any(t.is_alive() for t in threads)


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


def test_a_model_whose_cache_the_batch_cannot_hold_is_refused_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen3-Next's linear-attention layers keep a recurrent state per row, not keys and
    values per position: the engine says so when it starts, from the model's config, before
    any request and before the weights load."""
    tokenizer = build_tokenizer()
    config = Qwen3NextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    )
    model_dir = tmp_path / "qwen3-next"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    engine = Engine(
        config=make_config(model_dir, tmp_path), registry=local_registry(tmp_path / "adapters")
    )
    loaded: list[str] = []
    monkeypatch.setattr(engine_module, "load_model", lambda base, **_: loaded.append(base))
    with pytest.raises(FailedPrecondition, match=r"qwen3_next.*LinearAttentionLayer"):
        engine.load()
    assert not engine.ready
    assert loaded == []
