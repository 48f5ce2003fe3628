"""A KV cache that grows in place: transformers' DynamicLayer concatenates each step's keys
and values onto the layer's cache, a copy of the whole cache per layer per step (on a 2-core
CPU, about a tenth of a 16-row decoding step of the benchmark's model; on a GPU, memory
traffic that grows with every token). `GrowingLayer` keeps spare room after the cached
positions and writes new ones into it, copying only when the room runs out (then to 1.5x
what is needed, so copies become rarer as the cache grows) or when the batch replaced its
tensors (rows joined or left: inference/batch.py).

The cached keys and values it returns are views of the larger buffer: strided in the
position dimension, contiguous in the last, as attention kernels take them."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 16  # positions of spare room at the least


class GrowingLayer(DynamicLayer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values buffers

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cached = self.get_seq_length()
        need = cached + key_states.shape[-2]
        room = self._room
        if room is None or not self._backed_by(room[0]) or room[0].shape[-2] < need:
            room = self._room = self._grow(key_states, value_states, cached, need)
        keys, values = room
        keys[:, :, cached:need] = key_states
        values[:, :, cached:need] = value_states
        self.keys, self.values = keys[:, :, :need], values[:, :, :need]
        return self.keys, self.values

    def _backed_by(self, buffer: torch.Tensor) -> bool:
        """Whether the cached keys are still the front of `buffer` (the batch may have put
        new tensors in their place)."""
        keys = self.keys
        if keys is None or keys.numel() == 0:
            return False
        return (
            keys.data_ptr() == buffer.data_ptr()
            and keys.shape[:2] == buffer.shape[:2]
            and keys.stride() == buffer.stride()
        )

    def _grow(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cached: int, need: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = max(need + need // 2, need + MIN_ROOM)
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            shape = (new.shape[0], new.shape[1], capacity, new.shape[3])
            buffer = new.new_empty(shape)
            if cached:
                assert old is not None
                buffer[:, :, :cached] = old
            buffers.append(buffer)
        return buffers[0], buffers[1]


def growing_cache(config: PreTrainedConfig) -> DynamicCache:
    """The cache transformers would build for `config`, its plain full-attention layers
    replaced by GrowingLayer (sliding-window and other special layers are left as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
