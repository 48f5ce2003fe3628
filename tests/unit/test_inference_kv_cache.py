"""tuneserve.inference.kv_cache: the same keys and values as transformers' DynamicLayer,
written in place while there is room."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, PreTrainedConfig
from transformers.cache_utils import DynamicLayer

from tuneserve.inference.kv_cache import GrowingLayer, growing_cache


def states(rows: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, 2, positions, 4, generator=g),
        torch.randn(rows, 2, positions, 4, generator=g),
    )


def test_updates_match_dynamic_layer_and_are_written_in_place() -> None:
    growing, dynamic = GrowingLayer(), DynamicLayer()
    buffers = set()
    for i, n in enumerate([10] + [1] * 40):  # a prefill, then one position per step
        k, v = states(3, n, seed=i)
        gk, gv = growing.update(k, v)
        dk, dv = dynamic.update(k, v)
        assert torch.equal(gk, dk) and torch.equal(gv, dv)
        assert growing.get_seq_length() == dynamic.get_seq_length() == gk.shape[-2]
        buffers.add(gk.data_ptr())
    # 41 updates to 50 positions: new room only when it ran out (26, then 43, then 66).
    assert len(buffers) == 3


def test_tensors_put_in_its_place_are_taken_up() -> None:
    """As the batch does when rows join or leave: new tensors replace the cached ones."""
    growing, dynamic = GrowingLayer(), DynamicLayer()
    for layer in (growing, dynamic):
        layer.update(*states(3, 6, seed=0))
        layer.update(*states(3, 1, seed=1))
        keep = torch.tensor([0, 2])
        assert layer.keys is not None and layer.values is not None
        layer.keys = layer.keys.index_select(0, keep)[:, :, 2:]
        layer.values = layer.values.index_select(0, keep)[:, :, 2:]
    for i in range(5):
        k, v = states(2, 1, seed=2 + i)
        gk, gv = growing.update(k, v)
        dk, dv = dynamic.update(k, v)
        assert torch.equal(gk, dk) and torch.equal(gv, dv)


@pytest.mark.parametrize(
    "config",
    [
        GPT2Config(n_layer=3, n_embd=16, n_head=2),
        LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2),
    ],
    ids=["gpt2", "llama"],
)
def test_cache_for_a_model_replaces_its_full_attention_layers(config: PreTrainedConfig) -> None:
    cache = growing_cache(config)
    assert len(cache.layers) == 3
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
