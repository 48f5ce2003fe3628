"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The tiny offline GPT-2 style byte-level BPE tokenizer (no BOS, pad != eos)."""
    from tuneserve.tiny_models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer() -> Any:
    """The tiny Llama style tokenizer: every encoded sequence starts with <s>."""
    from tuneserve.tiny_models import build_tokenizer

    return build_tokenizer(bos=True)


@pytest.fixture(scope="session")
def save_lora() -> Any:
    """`save_lora(base_dir, out_dir, seed=, target_modules=)`: write a PEFT LoRA adapter for
    the model in `base_dir`. Its weights are random (not peft's zero B), so each adapter
    changes the output, and adapters with different seeds differ."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneserve.models import load_model

    def save(
        base_dir: Path, out_dir: Path, *, seed: int, target_modules: tuple[str, ...] = ("c_attn",)
    ) -> Path:
        torch.manual_seed(seed)
        base = load_model(str(base_dir), device=torch.device("cpu"), dtype=torch.float32)
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=4,
            target_modules=list(target_modules),
            lora_dropout=0.0,
            init_lora_weights=False,
        )
        get_peft_model(base, config).save_pretrained(out_dir)
        return out_dir

    return save


@pytest.fixture(scope="session")
def add_adapter(save_lora: Any) -> Any:
    """`add_adapter(registry, base_dir, adapter_id, seed=, **info)`: save a LoRA adapter into
    the registry's staging directory and register it, for base model `str(base_dir)`."""
    from tuneserve.registry import AdapterInfo, AdapterRegistry

    def add(
        registry: AdapterRegistry, base_dir: Path, adapter_id: str, *, seed: int, **info: Any
    ) -> AdapterInfo:
        staging = save_lora(base_dir, registry.staging_dir(), seed=seed)
        fields: dict[str, Any] = {
            "id": adapter_id,
            "base_model": str(base_dir),
            "r": 4,
            "alpha": 8.0,
            "dropout": 0.0,
            "target_modules": ("c_attn",),
            "source_job_id": "job",
            "final_loss": 1.0,
            "steps": 1,
            "trained_tokens": 10,
            **info,
        }
        return registry.register(staging, AdapterInfo(**fields))

    return add


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one torch thread is fastest, and far faster on a busy machine. Modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
