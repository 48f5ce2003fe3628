"""tuneserve.inference.kv_cache: the same keys and values as transformers' DynamicLayer,
written in place while there is room."""

from __future__ import annotations

import collections
import random

import pytest
import torch
from transformers import AutoConfig, GPT2Config, LlamaConfig, MistralConfig, PreTrainedConfig
from transformers.cache_utils import DynamicLayer

from tuneserve.errors import FailedPrecondition
from tuneserve.inference import kv_cache
from tuneserve.inference.kv_cache import GrowingLayer, growing_cache, windowed_attention


def states(rows: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, 2, positions, 4, generator=g),
        torch.randn(rows, 2, positions, 4, generator=g),
    )


def test_updates_match_dynamic_layer_and_are_written_in_place() -> None:
    growing, dynamic = GrowingLayer(), DynamicLayer()
    # Buffers the keys were read from, one entry each time it moved: a freed buffer's
    # address may be handed out again later, so distinct addresses would undercount. A new
    # buffer is allocated while the old one is alive (to copy from), so a move always shows.
    buffers: list[int] = []
    for i, n in enumerate([10] + [1] * 40):  # a prefill, then one position per step
        k, v = states(3, n, seed=i)
        gk, gv = growing.update(k, v)
        dk, dv = dynamic.update(k, v)
        assert torch.equal(gk, dk) and torch.equal(gv, dv)
        assert growing.get_seq_length() == dynamic.get_seq_length() == gk.shape[-2]
        if not buffers or buffers[-1] != gk.data_ptr():
            buffers.append(gk.data_ptr())
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
    ("config", "windowed"),
    [
        (GPT2Config(n_layer=3, n_embd=16, n_head=2), False),
        (LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2), False),
        (MistralConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2), True),
        (MistralConfig(num_hidden_layers=3, hidden_size=16, sliding_window=None), False),
    ],
    ids=["gpt2", "llama", "mistral-sliding", "mistral-full"],
)
def test_cache_for_a_model_replaces_its_attention_layers(
    config: PreTrainedConfig, windowed: bool
) -> None:
    """Sliding-window layers too: they keep every position, transformers' masks the window."""
    cache = growing_cache(config)
    assert len(cache.layers) == 3
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    assert windowed_attention(config) is windowed


class Reference:
    """The same operations on plain tensors: concatenation, index select, slicing."""

    def __init__(self) -> None:
        self.keys = torch.zeros(0)
        self.values = torch.zeros(0)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.keys.numel() == 0:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=-2)
            self.values = torch.cat([self.values, v], dim=-2)

    def keep_rows(self, keep: list[int]) -> None:
        self.keys, self.values = self.keys[keep], self.values[keep]

    def drop_front(self, n: int) -> None:
        self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]

    def append_rows(self, k: torch.Tensor, v: torch.Tensor, pad_mine: int, pad_theirs: int) -> None:
        def pad(t: torch.Tensor, n: int) -> torch.Tensor:
            return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)

        self.keys = torch.cat([pad(self.keys, pad_mine), pad(k, pad_theirs)])
        self.values = torch.cat([pad(self.values, pad_mine), pad(v, pad_theirs)])


def assert_same(layer: GrowingLayer, ref: Reference) -> None:
    assert layer.keys is not None and layer.values is not None
    assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
    assert layer.get_seq_length() == ref.keys.shape[-2]


def test_rows_leave_and_join_in_place_as_the_reference_does() -> None:
    layer, ref = GrowingLayer(), Reference()
    for target in (layer, ref):
        target.update(*states(5, 20, seed=0))
    buffers = layer._buffers()
    layer.keep_rows([0, 4, 2], drop_front=5)  # rows 1 and 3 leave, row 4 fills the gap
    ref.keep_rows([0, 4, 2])
    ref.drop_front(5)
    assert_same(layer, ref)
    k, v = states(1, 9, seed=1)  # a shorter row joins, padded to the batch's 15 positions
    layer.append_rows(k, v, pad_mine=0, pad_theirs=6)
    ref.append_rows(k, v, 0, 6)
    assert_same(layer, ref)
    k, v = states(1, 18, seed=2)  # a longer row: the others get 3 positions in front,
    layer.append_rows(k, v, pad_mine=3, pad_theirs=0)  # in room the drop left there
    ref.append_rows(k, v, 3, 0)
    assert_same(layer, ref)
    for i in range(3):
        step = states(5, 1, seed=3 + i)
        layer.update(*step)
        ref.update(*step)
        assert_same(layer, ref)
    # All of it in the buffers of the first update: no copy of the whole cache.
    assert layer._buffers()[0].data_ptr() == buffers[0].data_ptr()


@pytest.mark.parametrize("limited", [False, True], ids=["unlimited", "limits-and-shrinking"])
def test_random_joins_leaves_and_steps_match_the_reference(
    limited: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Buffers replaced when the room runs out (rows, positions, or room in front), or
    shrunk when rows leave, keep every row's keys and values, and padding is zeros wherever
    it came from."""
    rng = random.Random(0)
    layer, ref = GrowingLayer(), Reference()
    if limited:  # growth capped below what the batch reaches; any buffer may shrink
        monkeypatch.setattr(kv_cache, "MIN_SHRINK", 0)
        layer = GrowingLayer(max_rows=6, max_positions=50)
    first = states(2, 5, seed=0)
    layer.update(*first)
    ref.update(*first)
    replaced: collections.Counter[str] = collections.Counter()
    for i in range(300):
        buffer = layer._buffers()[0].data_ptr()
        rows, length = ref.keys.shape[0], ref.keys.shape[-2]
        op = rng.random()
        if op < 0.5:
            kind = "step"
            step = states(rows, 1, seed=1000 + i)
            layer.update(*step)
            ref.update(*step)
        elif op < 0.75 and rows > 1:
            kind = "leave"
            keep = rng.sample(range(rows), rng.randint(1, rows - 1))  # in any order
            shared = rng.randint(0, length - 1)
            layer.keep_rows(keep, drop_front=shared)
            ref.keep_rows(keep)
            ref.drop_front(shared)
        else:
            kind = "join"
            width = rng.randint(1, length + 12)
            k, v = states(rng.randint(1, 4), width, seed=2000 + i)
            total = max(length, width)
            layer.append_rows(k, v, pad_mine=total - length, pad_theirs=total - width)
            ref.append_rows(k, v, total - length, total - width)
        assert_same(layer, ref)
        rows_held, positions_held = room(layer)
        fresh_rows, fresh_positions = layer._room_for(*ref.keys.shape[::2], 0)
        assert rows_held * positions_held <= max(
            kv_cache.SHRINK_AT * fresh_rows * fresh_positions, kv_cache.MIN_SHRINK
        )
        replaced[kind, layer._buffers()[0].data_ptr() != buffer] += 1
    assert replaced["leave", False] + replaced["leave", True] > 50
    # New buffers now and then, not at every change, and seldom at a step (the hot path).
    assert 0 < sum(n for (_, new), n in replaced.items() if new) < (120 if limited else 60)
    assert replaced["step", True] < 10
    if limited:
        assert replaced["leave", True] > 0  # rows that left gave their room back


def test_transformers_own_row_selection_is_taken_up() -> None:
    """DynamicLayer's batch_select_indices puts a new tensor in the layer's place: the
    next operation copies it into buffers of the layer's own."""
    layer, ref = GrowingLayer(), Reference()
    layer.update(*states(3, 4, seed=0))
    ref.update(*states(3, 4, seed=0))
    layer.batch_select_indices(torch.tensor([0, 2]))
    ref.keep_rows([0, 2])
    k, v = states(1, 2, seed=1)
    layer.append_rows(k, v, pad_mine=0, pad_theirs=2)
    ref.append_rows(k, v, 0, 2)
    assert_same(layer, ref)


def test_new_keys_for_the_wrong_number_of_rows_are_refused() -> None:
    layer = GrowingLayer()
    layer.update(*states(3, 4, seed=0))
    with pytest.raises(ValueError, match="2 rows of new keys for a cache of 3 rows"):
        layer.update(*states(2, 1, seed=1))


def room(layer: GrowingLayer) -> tuple[int, int]:
    """The buffers' rows and positions."""
    keys = layer._buffers()[0]
    return keys.shape[0], keys.shape[-2]


def test_room_grown_ahead_of_need_stops_at_the_limits() -> None:
    layer, ref = GrowingLayer(max_rows=5, max_positions=40), Reference()
    for target in (layer, ref):
        target.update(*states(4, 30, seed=0))
    assert room(layer) == (4, 40)  # 30 + 15 positions wanted, 40 at most
    k, v = states(1, 30, seed=1)
    layer.append_rows(k, v, pad_mine=0, pad_theirs=0)
    ref.append_rows(k, v, 0, 0)
    assert room(layer) == (5, 40)  # 4 + 2 rows wanted, 5 at most
    buffers = set()
    for i in range(15):  # past the limit: room grows as it would without one
        step = states(5, 1, seed=2 + i)
        layer.update(*step)
        ref.update(*step)
        assert_same(layer, ref)
        buffers.add(layer._buffers()[0].data_ptr())
    assert room(layer) == (5, 61) and len(buffers) == 2  # not new buffers at each step
    k, v = states(2, 45, seed=20)
    layer.append_rows(k, v, pad_mine=0, pad_theirs=0)
    ref.append_rows(k, v, 0, 0)
    assert_same(layer, ref)
    assert room(layer) == (7, 67)  # rows past the limit: new buffers, 45 + 22 positions


def test_buffers_shrink_when_most_rows_have_left() -> None:
    layer, ref = GrowingLayer(), Reference()
    for target in (layer, ref):
        target.update(*states(32, 200, seed=0))
    assert room(layer) == (32, 300)
    stay = [5, 1, 30, 7, 2, 3, 9, 12, 20, 21, 22, 23]  # buffers 4x what they use: kept
    layer.keep_rows(stay, drop_front=0)
    ref.keep_rows(stay)
    assert_same(layer, ref)
    assert room(layer) == (32, 300)
    layer.keep_rows([6, 0, 3], drop_front=10)  # fewer: smaller buffers, the rest freed
    ref.keep_rows([6, 0, 3])
    ref.drop_front(10)
    assert_same(layer, ref)
    assert room(layer) == (4, 285)
    step = states(3, 1, seed=1)
    layer.update(*step)
    ref.update(*step)
    assert_same(layer, ref)


def test_small_buffers_are_not_replaced_to_save_memory() -> None:
    """Below MIN_SHRINK row-positions a copy would cost more than the memory it frees."""
    layer = GrowingLayer()
    layer.update(*states(16, 40, seed=0))
    before = layer._buffers()[0].data_ptr()
    layer.keep_rows([3], drop_front=0)
    assert layer._buffers()[0].data_ptr() == before


@pytest.mark.parametrize(
    ("model_type", "layer"),
    [
        ("qwen3_next", "LinearAttentionLayer"),  # linear attention beside full attention
        ("jamba", "LinearAttentionLayer"),  # Mamba layers' recurrent state
        ("falcon_h1", "LinearAttentionAndFullAttentionLayer"),
        ("gemma3n", "DummyLayer"),  # layers that reuse another layer's keys
        ("glm_moe_dsa", "DynamicIndexedLayer"),  # sparse attention's indexer keys
    ],
)
def test_models_whose_cache_rows_cannot_join_and_leave_are_refused(
    model_type: str, layer: str
) -> None:
    config = AutoConfig.for_model(model_type)
    for build in (kv_cache.check_batchable, growing_cache):
        with pytest.raises(FailedPrecondition, match=f"{model_type}.*{layer}"):
            build(config)


@pytest.mark.parametrize("config", [GPT2Config(), LlamaConfig(), MistralConfig(sliding_window=8)])
def test_attention_models_are_batchable(config: PreTrainedConfig) -> None:
    kv_cache.check_batchable(config)
    assert all(type(layer) is GrowingLayer for layer in growing_cache(config).layers)
