"""tuneserve.training.lora_dropout: the CPU LoRA dropout is dropout (same keep rate, same
scale, identity in eval mode) and replaces peft's in every LoRA layer."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tuneserve.models import load_model
from tuneserve.tiny_models import build_tiny_model
from tuneserve.training.lora_dropout import CpuDropout, use_cpu_dropout


def test_keeps_one_minus_p_of_the_elements_scaled_by_one_over_one_minus_p() -> None:
    torch.manual_seed(0)
    dropout = CpuDropout(0.2).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.8) < 0.002  # 1e6 draws: sd 0.0004
    assert torch.allclose(y[kept], torch.tensor(1 / 0.8))
    y.sum().backward()  # the gradient flows through the kept elements only, scaled
    assert x.grad is not None
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept], torch.tensor(1 / 0.8))
    assert torch.equal(dropout.eval()(x), x)


def test_swaps_every_lora_dropout_and_leaves_the_rest(tmp_path: Path) -> None:
    base = load_model(
        str(build_tiny_model(tmp_path / "gpt2")), device=torch.device("cpu"), dtype=torch.float32
    )
    model = get_peft_model(
        base, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    before = sum(isinstance(m, nn.Dropout) for m in model.modules())
    swapped = use_cpu_dropout(model)
    assert swapped > 0
    assert sum(isinstance(m, CpuDropout) for m in model.modules()) == swapped
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == before - swapped
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, CpuDropout))
