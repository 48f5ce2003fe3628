"""The running batch of a continuous-batching decoder: one KV cache for every row in flight.

Rows are left-padded to a common length. Rows that join are prefilled together (one
forward over their left-padded prompts) and their cache is merged in with one concatenation
per layer (the shorter side gets zero padding on the left, masked out); rows that
finish are dropped with an index select, and padding that every row shares is trimmed.
Each row carries its own position ids, so absolute (GPT-2) and rotary (Llama) positions both
stay right however much padding sits in front of a row.

Not thread-safe: the scheduler's thread owns it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from transformers import DynamicCache

T = TypeVar("T")


@dataclass
class Slot(Generic[T]):
    """One row: who it is for, how much padding is in front of it, what to feed next."""

    owner: T
    pad: int  # leading cache positions that are padding
    next_token: int  # the token to feed at the next step
    position: int  # the position id of next_token: real tokens already in the cache


class DecodeBatch(Generic[T]):
    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.slots: list[Slot[T]] = []
        self.length = 0  # cache positions per row, padding included

    def __len__(self) -> int:
        return len(self.slots)

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
        if self.cache is None or not self.slots:
            self.cache, self.length, self.slots = cache, width, slots
            return
        total = max(self.length, width)
        layers: list[Any] = list(self.cache.layers)  # DynamicLayer: .keys/.values [B, H, T, D]
        theirs_layers: list[Any] = list(cache.layers)
        for mine, theirs in zip(layers, theirs_layers, strict=True):
            mine.keys = torch.cat(
                [_left_pad(mine.keys, total - self.length), _left_pad(theirs.keys, total - width)]
            )
            mine.values = torch.cat(
                [
                    _left_pad(mine.values, total - self.length),
                    _left_pad(theirs.values, total - width),
                ]
            )
        for s in self.slots:
            s.pad += total - self.length
        for s in slots:
            s.pad += total - width
        self.slots.extend(slots)
        self.length = total

    def inputs(self, device: torch.device) -> dict[str, Any]:
        """Model inputs for one decoding step of every row."""
        pads = torch.tensor([s.pad for s in self.slots], device=device)
        mask = (torch.arange(self.length + 1, device=device)[None, :] >= pads[:, None]).long()
        return {
            "input_ids": torch.tensor([[s.next_token] for s in self.slots], device=device),
            "position_ids": torch.tensor([[s.position] for s in self.slots], device=device),
            "attention_mask": mask,
            "past_key_values": self.cache,
            "use_cache": True,
        }

    def advanced(self, next_tokens: Sequence[int]) -> None:
        """After a step: the cache grew by one position; each row feeds its new token next."""
        self.length += 1
        for s, token in zip(self.slots, next_tokens, strict=True):
            s.next_token = token
            s.position += 1

    def remove(self, done: set[int]) -> None:
        """Drop the rows at these indices and trim padding that every remaining row has."""
        if not done:
            return
        keep = [i for i in range(len(self.slots)) if i not in done]
        self.slots = [self.slots[i] for i in keep]
        if not self.slots:
            self.cache, self.length = None, 0
            return
        assert self.cache is not None
        layers: list[Any] = list(self.cache.layers)
        index = torch.tensor(keep, device=layers[0].keys.device)
        shared = min(s.pad for s in self.slots)
        for layer in layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, shared:]
            layer.values = layer.values.index_select(0, index)[:, :, shared:]
        for s in self.slots:
            s.pad -= shared
        self.length -= shared


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)
