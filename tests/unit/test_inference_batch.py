"""tuneserve.inference.batch: rows join and leave a shared KV cache and decode exactly as alone."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from tests.support import greedy_reference
from tuneserve.inference.batch import DecodeBatch
from tuneserve.inference.kv_cache import growing_cache, windowed_attention
from tuneserve.models import load_model
from tuneserve.tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


# Each architecture with each attention implementation the batch hands a ready 4D mask to,
# and architectures with sliding-window layers (Mistral: every layer; Qwen2 here: one of two),
# whose windows the steps' masks must keep once rows outgrow them.
@pytest.fixture(
    scope="module",
    params=[
        "gpt2-sdpa",
        "gpt2-eager",
        "llama-sdpa",
        "llama-eager",
        "mistral-sdpa",
        "mistral-eager",
        "qwen2-sdpa",
    ],
)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    architecture, attention = request.param.split("-")
    path = build_tiny_model(
        tmp_path_factory.mktemp("tiny") / architecture, architecture=architecture
    )
    model = load_model(str(path), device=CPU, dtype=torch.float32)
    model.set_attn_implementation(attention)
    model.eval()
    return model


def new_batch(model: PreTrainedModel, attention: str | None = None) -> DecodeBatch[Row]:
    if attention is None:
        return DecodeBatch.for_model(model)
    return DecodeBatch(attention=attention, dtype=model.dtype)


def prompt(length: int, offset: int) -> list[int]:
    """Token ids 3.. (0-2 are the special tokens) that differ between prompts."""
    return [3 + (offset + 7 * i) % 250 for i in range(length)]


@dataclass(eq=False)
class Row:
    ids: list[int]
    budget: int
    tokens: list[int] = field(default_factory=list)


@torch.inference_mode()
def join(model: PreTrainedModel, batch: DecodeBatch[Row], row: Row) -> None:
    """Prefill a row on its own and merge it into the batch, as the scheduler does (into a
    cache that grows in place; the reference, greedy_reference, concatenates)."""
    cache = growing_cache(model.config)
    out = model(input_ids=torch.tensor([row.ids]), past_key_values=cache, use_cache=True)
    row.tokens.append(int(out.logits[0, -1].argmax()))
    batch.add(
        [row], out.past_key_values, width=len(row.ids), pads=[0], next_tokens=[row.tokens[-1]]
    )


@torch.inference_mode()
def step(model: PreTrainedModel, batch: DecodeBatch[Row]) -> list[Row]:
    """One greedy step for every row; the rows that reached their budget leave. Returns them."""
    logits = model(**batch.inputs(CPU)).logits
    tokens = [int(logits[i, -1].argmax()) for i in range(len(batch))]
    batch.advanced(tokens)
    done = set()
    for i, (slot, token) in enumerate(zip(batch.slots, tokens, strict=True)):
        slot.owner.tokens.append(token)
        if len(slot.owner.tokens) >= slot.owner.budget:
            done.add(i)
    left = [batch.slots[i].owner for i in sorted(done)]
    batch.remove(done)
    return left


def assert_consistent(batch: DecodeBatch[Row]) -> None:
    """The cache holds `length` positions per row, and no padding is shared by every row."""
    assert batch.cache is not None
    assert batch.cache.get_seq_length() == batch.length
    assert all(layer.keys.shape[0] == len(batch) for layer in batch.cache.layers)
    assert min(s.pad for s in batch.slots) == 0
    for s in batch.slots:
        assert s.position == len(s.owner.ids) + len(s.owner.tokens) - 1  # real tokens cached
        assert s.pad + s.position == batch.length


def test_rows_joining_and_leaving_decode_exactly_as_alone(model: PreTrainedModel) -> None:
    a = Row(prompt(7, 0), budget=14)
    b = Row(prompt(3, 1), budget=5)  # shorter than the batch: it is padded on the left
    c = Row(prompt(16, 2), budget=6)  # longer than the batch: the others are padded
    batch = new_batch(model)
    finished: list[Row] = []

    join(model, batch, a)
    for _ in range(3):
        finished += step(model, batch)
    join(model, batch, b)
    assert batch.length == 10 and [s.pad for s in batch.slots] == [0, 7]
    assert_consistent(batch)
    for _ in range(2):
        finished += step(model, batch)
    join(model, batch, c)
    assert batch.length == 16 and [s.pad for s in batch.slots] == [4, 11, 0]
    assert_consistent(batch)

    while batch:
        before = batch.length
        left = step(model, batch)
        finished += left
        if left and batch:
            assert_consistent(batch)
        if left == [c]:
            # a alone is left with the 4 padding positions c's join put in front of it: trimmed
            assert [s.owner for s in batch.slots] == [a]
            assert batch.length == before + 1 - 4
            assert batch.slots[0].pad == 0

    assert finished == [b, c, a]  # they left at different steps, in this order
    for row in (a, b, c):
        assert len(row.tokens) == row.budget
        assert row.tokens == greedy_reference(model, row.ids, row.budget)


def test_removing_every_row_resets_the_cache_and_the_batch_starts_afresh(
    model: PreTrainedModel,
) -> None:
    batch = new_batch(model)
    first, second = Row(prompt(9, 3), budget=4), Row(prompt(5, 4), budget=4)
    join(model, batch, first)
    join(model, batch, second)
    step(model, batch)
    batch.remove({0, 1})
    assert len(batch) == 0 and not batch
    assert batch.cache is None
    assert batch.length == 0

    again = Row(prompt(4, 5), budget=5)
    join(model, batch, again)
    assert batch.length == 4 and batch.slots[0].pad == 0
    while batch:
        step(model, batch)
    assert again.tokens == greedy_reference(model, again.ids, again.budget)


def test_removing_no_rows_changes_nothing(model: PreTrainedModel) -> None:
    batch = new_batch(model)
    short, long = Row(prompt(2, 6), budget=99), Row(prompt(6, 7), budget=99)
    join(model, batch, short)
    join(model, batch, long)
    cache = batch.cache
    batch.remove(set())
    assert batch.cache is cache
    assert batch.length == 6
    assert [s.pad for s in batch.slots] == [4, 0]
    assert [s.owner for s in batch.slots] == [short, long]


def test_padding_of_the_rows_that_stay_is_kept_when_not_shared(model: PreTrainedModel) -> None:
    batch = new_batch(model)
    rows = [Row(prompt(3, 8), budget=6), Row(prompt(8, 9), budget=2), Row(prompt(5, 10), budget=6)]
    for row in rows:
        join(model, batch, row)
    assert [s.pad for s in batch.slots] == [5, 0, 3]
    step(model, batch)  # the 8-token row leaves: 3 padding positions are shared by the rest
    assert [s.owner for s in batch.slots] == [rows[0], rows[2]]
    assert [s.pad for s in batch.slots] == [2, 0]
    assert batch.length == 9 - 3
    assert_consistent(batch)
    while batch:
        step(model, batch)
    for row in rows:
        assert row.tokens == greedy_reference(model, row.ids, row.budget)


@pytest.mark.parametrize("fallback", [False, True], ids=["4d", "2d-fallback"])
def test_the_ready_mask_gives_the_logits_of_the_padding_mask(
    model: PreTrainedModel, fallback: bool
) -> None:
    """The ready-made 4D mask in the model's form (or, for an implementation without one
    and for models with sliding windows, the 2D mask) against the 2D padding mask
    transformers turns into its own, over several steps, a join (the mask is rebuilt) and a
    leave (rebuilt again, shorter)."""
    batch = new_batch(model, "flash_attention_2" if fallback else None)
    rows = [Row(prompt(3, 11), budget=99), Row(prompt(9, 12), budget=99)]
    join(model, batch, rows[0])
    for stage in range(5):
        if stage == 2:
            join(model, batch, rows[1])
        if stage == 4:
            batch.remove({0})
        inputs = batch.inputs(CPU)
        mask = inputs["attention_mask"]
        assert mask.dim() == (2 if fallback or windowed_attention(model.config) else 4)
        padding = torch.tensor(
            [[0] * s.pad + [1] * (batch.length + 1 - s.pad) for s in batch.slots]
        )
        with torch.inference_mode():
            cache = copy.deepcopy(inputs["past_key_values"])
            theirs = model(**{**inputs, "attention_mask": padding, "past_key_values": cache})
            ours = model(**inputs).logits
        torch.testing.assert_close(ours, theirs.logits)
        batch.advanced([int(t) for t in ours[:, -1].argmax(-1)])
