"""The running batch of a continuous-batching decoder: one KV cache for every row in flight.

Rows are left-padded to a common length. Rows that join are prefilled together (one
forward over their left-padded prompts) and their cache is merged in (the shorter side gets
zero padding on the left, masked out); rows that finish are dropped, and padding that every
row shares is trimmed. On the cache's GrowingLayers (inference/kv_cache.py) all of that
happens in place, in the layers' spare room: a join copies the newcomers' keys and values,
a leave moves one row from the tail into each gap, and neither copies the whole cache.
Each row carries its own position ids, so absolute (GPT-2) and rotary (Llama) positions both
stay right however much padding sits in front of a row.

A decoding step's inputs are built from tensors kept between steps, not from the rows: the
position ids grow by one per step, and the attention mask is handed to the model ready
made, in the 4D form its attention implementation takes (sdpa: a boolean mask, eager: an
additive float one), so transformers skips building it from a 2D padding mask every step
(on a 2-core CPU, 5-15% of a 16-row decoding forward of the benchmark's model). The mask is
kept with spare columns, every column after a row's padding open, so a step only slices
it; it is rebuilt when rows join or leave. Other implementations (flash attention), and
models with sliding-window or chunked layers (whose windows transformers applies), get
the 2D mask.

Not thread-safe: the scheduler's thread owns it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from transformers import DynamicCache, PreTrainedModel

from tuneserve.inference.kv_cache import GrowingLayer, windowed_attention

T = TypeVar("T")
MASK_ROOM = 32  # spare mask columns kept beyond the cache's length
PADDING_MASK = "padding"  # an `attention` for which steps get the 2D padding mask


@dataclass
class Slot(Generic[T]):
    """One row: who it is for, how much padding is in front of it, what to feed next."""

    owner: T
    pad: int  # leading cache positions that are padding
    next_token: int  # the token to feed at the next step
    position: int  # the position id of next_token: real tokens already in the cache


class DecodeBatch(Generic[T]):
    @classmethod
    def for_model(cls, model: PreTrainedModel) -> DecodeBatch[T]:
        """A batch whose steps get the mask `model`'s attention takes: ready made, or the 2D
        padding mask when some of its layers attend within a window (sliding or chunked
        attention), whose masks transformers builds."""
        config = model.config
        attention = PADDING_MASK if windowed_attention(config) else config._attn_implementation
        return cls(attention=attention, dtype=model.dtype)

    def __init__(self, attention: str = "sdpa", dtype: torch.dtype = torch.float32) -> None:
        """`attention`: the model's attention implementation (config._attn_implementation);
        `dtype`: its compute dtype (an eager mask is added to the attention scores)."""
        self.cache: DynamicCache | None = None
        self.slots: list[Slot[T]] = []
        self.length = 0  # cache positions per row, padding included
        self._attention, self._dtype = attention, dtype
        # Kept between steps, dropped whenever rows join or leave:
        self._mask: torch.Tensor | None = None  # [rows, 1, 1, columns >= length + 1]
        self._positions: torch.Tensor | None = None  # [rows, 1]

    def __len__(self) -> int:
        return len(self.slots)

    @torch.inference_mode()
    def add(
        self,
        owners: Sequence[T],
        cache: DynamicCache,
        *,
        width: int,
        pads: Sequence[int],
        next_tokens: Sequence[int],
    ) -> None:
        """Merge rows prefilled together (a cache of `width` positions, row i left-padded
        by pads[i]) into the batch."""
        slots = [
            Slot(owner=o, pad=p, next_token=t, position=width - p)
            for o, p, t in zip(owners, pads, next_tokens, strict=True)
        ]
        self._changed()
        if self.cache is None or not self.slots:
            self.cache, self.length, self.slots = cache, width, slots
            return
        total = max(self.length, width)
        pad_mine, pad_theirs = total - self.length, total - width
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            keys, values = theirs.keys, theirs.values
            assert keys is not None and values is not None  # prefilled
            mine.append_rows(keys, values, pad_mine=pad_mine, pad_theirs=pad_theirs)
        for s in self.slots:
            s.pad += total - self.length
        for s in slots:
            s.pad += total - width
        self.slots.extend(slots)
        self.length = total

    def inputs(self, device: torch.device) -> dict[str, Any]:
        """Model inputs for one decoding step of every row."""
        if self._positions is None:
            self._positions = torch.tensor([[s.position] for s in self.slots], device=device)
        return {
            "input_ids": torch.tensor([[s.next_token] for s in self.slots], device=device),
            "position_ids": self._positions,
            "attention_mask": self._attention_mask(device),
            "past_key_values": self.cache,
            "use_cache": True,
        }

    def advanced(self, next_tokens: Sequence[int]) -> None:
        """After a step: the cache grew by one position; each row feeds its new token next."""
        self.length += 1
        for s, token in zip(self.slots, next_tokens, strict=True):
            s.next_token = token
            s.position += 1
        if self._positions is not None:
            self._positions = self._positions + 1

    def _attention_mask(self, device: torch.device) -> torch.Tensor:
        """Every row sees its cache from its padding on, and the token it feeds."""
        columns = self.length + 1
        if self._mask is None or self._mask.shape[-1] < columns:
            pads = torch.tensor([s.pad for s in self.slots], device=device)
            width = columns + MASK_ROOM
            visible = torch.arange(width, device=device)[None, :] >= pads[:, None]
            if self._attention == "sdpa":  # True where a row attends
                self._mask = visible[:, None, None, :]
            elif self._attention == "eager":  # added to the scores: 0 or the dtype's minimum
                closed = torch.finfo(self._dtype).min
                mask = torch.zeros(visible.shape, dtype=self._dtype, device=device)
                self._mask = mask.masked_fill_(~visible, closed)[:, None, None, :]
            else:  # PADDING_MASK or flash attention: transformers builds what it needs
                self._mask = visible.long()
        return self._mask[..., :columns]

    def _changed(self) -> None:
        self._mask = self._positions = None

    @torch.inference_mode()
    def remove(self, done: set[int]) -> None:
        """Drop the rows at these indices and trim padding that every remaining row has."""
        if not done:
            return
        self._changed()
        # The rows that stay, each gap filled from the tail: in the cache's GrowingLayers
        # only the rows moved into gaps are copied.
        stay = len(self.slots) - len(done)
        tail = [i for i in range(stay, len(self.slots)) if i not in done]
        order = [tail.pop() if i in done else i for i in range(stay)]
        self.slots = [self.slots[i] for i in order]
        if not self.slots:
            self.cache, self.length = None, 0
            return
        assert self.cache is not None
        shared = min(s.pad for s in self.slots)
        for layer in _layers(self.cache):
            layer.keep_rows(order, drop_front=shared)
        for s in self.slots:
            s.pad -= shared
        self.length -= shared


def _layers(cache: DynamicCache) -> list[GrowingLayer]:
    """The cache's layers, every one a GrowingLayer (`growing_cache` refuses other models)."""
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        if not isinstance(layer, GrowingLayer):
            raise TypeError(f"a batch's cache holds GrowingLayers, not {type(layer).__name__}")
    return layers
