"""A KV cache that grows in place, and that rows join and leave in place.

transformers' DynamicLayer concatenates each step's keys and values onto the layer's cache:
a copy of the whole cache per layer per step (on a 2-core CPU, about a tenth of a 16-row
decoding step of the benchmark's model; on a GPU, memory traffic that grows with every
token). `GrowingLayer` keeps its positions in buffers with spare room, rows and columns,
and writes new ones into that room:

- a step's keys and values go after the cached positions (`update`);
- rows that finished leave (`keep_rows`): only rows given a new place are copied, and
  padding that every row has is forgotten by moving the window's start;
- rows prefilled together join after the others (`append_rows`), left-padded with zeros
  to the batch's length; when they are longer, the other rows get the zero padding in
  front, in room that padding forgotten earlier left there.

Buffers are replaced (the cached positions copied to the front of new ones, 1.5 times as
large as needed) only when the room runs out, when the layer's tensors were replaced by
someone else (transformers' own cache operations), or when they are more than SHRINK_AT
times the size new ones would be (rows left): memory that rows gave back is freed then,
not held until the batch empties. Room grown ahead of need stops at `max_rows` rows and
`max_positions` positions when they are given (the scheduler's batch size, and the longest
prompt plus generation it accepts): spare room never exceeds what the largest batch uses.
Every column a row's attention can see holds its keys and values or zeros, never
uninitialised memory (masked positions still enter the attention arithmetic: 0 times NaN
is NaN).

The cached keys and values it returns are views of the buffers: strided in the row and
position dimensions, contiguous in the last, as attention kernels take them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tuneserve.errors import FailedPrecondition

MIN_ROOM = 16  # positions of spare room at the least
SHRINK_AT = 4  # buffers this many times the size new ones would have are replaced
MIN_SHRINK = 4096  # ... when they hold more than this many row-positions
# The cache layers of attention with keys and values per position, which GrowingLayer replaces.
GROWABLE = (DynamicLayer, DynamicSlidingWindowLayer)


class GrowingLayer(DynamicLayer):
    def __init__(
        self, *, max_rows: int | None = None, max_positions: int | None = None, **kwargs: Any
    ) -> None:
        """`max_rows`, `max_positions`: the most room grown ahead of need (a join or a step
        that needs more still gets it)."""
        super().__init__(**kwargs)
        self._max_rows, self._max_positions = max_rows, max_positions
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None  # [rows, heads, cols, dim]
        self._start = 0  # the buffer column of the first cached position
        self._view: torch.Tensor | None = None  # the keys this layer last handed out

    @property
    def rows(self) -> int:
        keys = self.keys
        return 0 if keys is None or keys.dim() < 4 else int(keys.shape[0])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cached, rows = self.get_seq_length(), key_states.shape[0]
        if cached and rows != self.rows:
            raise ValueError(f"{rows} rows of new keys for a cache of {self.rows} rows")
        need = cached + key_states.shape[-2]
        self._reserve(rows, need, like=(key_states, value_states))
        keys, values = self._buffers()
        end = self._start + cached
        keys[:rows, :, end : self._start + need] = key_states
        values[:rows, :, end : self._start + need] = value_states
        return self._show(rows, need)

    def keep_rows(self, rows: Sequence[int], *, drop_front: int = 0) -> None:
        """Keep the rows at these indices, in this order, and forget the first `drop_front`
        positions of every row (padding they all have). Only the rows that change place
        are copied: with the batch filling each gap from the tail, one row per row that
        left. When the rows that stay use a small part of the buffers, they move to smaller
        ones and the rest is freed."""
        self._adopt()
        length = self.get_seq_length() - drop_front
        self._start += drop_front
        window = slice(self._start, self._start + length)
        moves = [(to, source) for to, source in enumerate(rows) if to != source]
        if moves and {to for to, _ in moves}.isdisjoint(source for _, source in moves):
            for buffer in self._buffers():  # no row is written before it is read
                for to, source in moves:
                    buffer[to, :, window].copy_(buffer[source, :, window])
        elif moves:  # rows trade places: read them all first
            device = self._buffers()[0].device
            targets = torch.tensor([to for to, _ in moves], device=device)
            sources = torch.tensor([source for _, source in moves], device=device)
            for buffer in self._buffers():
                view = buffer[:, :, window]
                view.index_copy_(0, targets, view.index_select(0, sources))
        kept = self._show(len(rows), length)
        self._reserve(len(rows), length, like=kept)  # smaller buffers if many rows left

    def append_rows(
        self, keys: torch.Tensor, values: torch.Tensor, *, pad_mine: int, pad_theirs: int
    ) -> None:
        """Add rows after the current ones: theirs get `pad_theirs` positions of padding in
        front, the current rows `pad_mine` (one of the two is 0: the longer side's length
        is the new length)."""
        self._adopt()
        rows, length = self.rows, self.get_seq_length()
        total = length + pad_mine
        if keys.shape[-2] + pad_theirs != total:
            raise ValueError(f"rows of {keys.shape[-2]} + {pad_theirs} positions for {total}")
        self._reserve(rows + keys.shape[0], length, like=(keys, values), front=pad_mine)
        self._start -= pad_mine
        start, end = self._start, self._start + total
        for buffer, new in zip(self._buffers(), (keys, values), strict=True):
            buffer[:rows, :, start : start + pad_mine] = 0
            buffer[rows : rows + new.shape[0], :, start : start + pad_theirs] = 0
            buffer[rows : rows + new.shape[0], :, start + pad_theirs : end] = new
        self._show(rows + keys.shape[0], total)

    # --- internals

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._room is not None
        return self._room

    def _backed(self) -> bool:
        """Whether the cached keys are still this layer's view of its buffers (someone may
        have put other tensors in their place)."""
        return self._room is not None and self.keys is self._view

    def _adopt(self) -> None:
        """Take tensors put in the layer's place into buffers of its own."""
        if not self._backed():
            keys, values = self.keys, self.values
            if keys is None or values is None or keys.dim() < 4:
                raise ValueError("the layer holds no cached positions yet")
            self._reserve(self.rows, self.get_seq_length(), like=(keys, values))

    def _reserve(
        self,
        rows: int,
        columns: int,
        *,
        like: tuple[torch.Tensor, torch.Tensor],
        front: int = 0,
    ) -> None:
        """Room for `rows` rows of `columns` positions from the start, with `front`
        columns free before the start; new buffers (the cached positions copied over)
        when the current ones lack it or are far larger than needed."""
        room = self._room if self._backed() else None
        have_rows = room[0].shape[0] if room is not None else 0
        fresh_rows, capacity = self._room_for(rows, columns, front)
        if (
            room is not None
            and rows <= have_rows
            and front <= self._start
            and self._start + columns <= room[0].shape[-2]
            and not _too_big(have_rows * room[0].shape[-2], fresh_rows * capacity)
        ):
            return
        cached = self.get_seq_length() if self.is_initialized else 0
        old_rows = self.rows if cached else 0
        if rows <= have_rows:
            new_rows = have_rows
        else:
            new_rows = _capped(max(rows, have_rows + have_rows // 2), rows, self._max_rows)
        if _too_big(new_rows * capacity, fresh_rows * capacity):  # rows left: room back
            new_rows = fresh_rows
        buffers = []
        for old, new in zip((self.keys, self.values), like, strict=True):
            buffer = new.new_empty((new_rows, new.shape[1], capacity, new.shape[3]))
            if cached:
                assert old is not None
                buffer[:old_rows, :, front : front + cached] = old
            buffers.append(buffer)
        self._room = (buffers[0], buffers[1])
        self._start = front
        self._show(old_rows, cached)

    def _room_for(self, rows: int, columns: int, front: int) -> tuple[int, int]:
        """Rows and positions of new buffers for `rows` rows of `columns` positions with
        `front` free before them: half as much again, within the limits."""
        want = front + max(columns + columns // 2, columns + MIN_ROOM)
        return (
            _capped(rows + rows // 2, rows, self._max_rows),
            _capped(want, front + columns, self._max_positions),
        )

    def _show(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Point keys and values at `rows` rows of `length` positions from the start."""
        keys, values = self._buffers()
        window = slice(self._start, self._start + length)
        self.keys, self.values = keys[:rows, :, window], values[:rows, :, window]
        self._view = self.keys
        return self.keys, self.values


def _too_big(held: int, fresh: int) -> bool:
    """Whether buffers of `held` row-positions are worth replacing by `fresh` ones."""
    return held > max(SHRINK_AT * fresh, MIN_SHRINK)


def _capped(want: int, need: int, limit: int | None) -> int:
    """`want` (at least `need`), no more than `limit` unless `need` is past it already: then
    room grows as it would without one, rather than by the one position each step needs."""
    return want if limit is None or need > limit else min(want, limit)


def growing_cache(
    config: PreTrainedConfig, *, max_rows: int | None = None, max_positions: int | None = None
) -> DynamicCache:
    """The cache transformers would build for `config`, its attention layers (full, sliding
    and chunked: GROWABLE) replaced by GrowingLayer, growing room ahead of need up to
    `max_rows` rows and `max_positions` positions.

    Sliding-window and chunked layers keep every position rather than the last window's:
    rows of different lengths share the cache's columns, so no one cut fits them all.
    transformers' masks, built from the 2D padding mask (`windowed_attention`), keep each
    query within its window. Models with other layers are refused (`check_batchable`)."""
    cache = DynamicCache(config=config)
    _refuse_other_layers(cache, config)
    cache.layers = [
        GrowingLayer(max_rows=max_rows, max_positions=max_positions) for _ in cache.layers
    ]
    return cache


def check_batchable(config: PreTrainedConfig) -> None:
    """Refuse a model whose cache has layers that rows cannot join and leave: recurrent or
    convolution state (linear attention, Mamba-style hybrids), keys shared with another
    layer or layers without attention (DummyLayer), indexer keys (sparse attention). The
    batch would mix the rows' state or lose it; refused when the model loads, not at the
    first request."""
    _refuse_other_layers(DynamicCache(config=config), config)


def _refuse_other_layers(cache: DynamicCache, config: PreTrainedConfig) -> None:
    other = {type(layer).__name__ for layer in cache.layers if type(layer) not in GROWABLE}
    if other:
        raise FailedPrecondition(
            f"model type {config.model_type!r} cannot be served: its cache has "
            f"{', '.join(sorted(other))} layers, which batched generation does not support "
            "(every layer must be full, sliding-window or chunked attention)",
            field="base_model",
        )


def windowed_attention(config: PreTrainedConfig) -> bool:
    """Whether some of the model's layers attend within a window (sliding or chunked
    attention), whose masks transformers builds from the 2D padding mask."""
    return any(
        type(layer) is DynamicSlidingWindowLayer for layer in DynamicCache(config=config).layers
    )
