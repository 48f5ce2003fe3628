"""Batched multi-adapter LoRA: every row of one forward may use a different adapter (or
none), in plain torch, with no Python loop over adapters (the idea of S-LoRA and Punica).

Each LoRA-targeted layer of the base model is wrapped once (`BatchedLoraLinear`,
`BatchedLoraEmbedding`; the original layer stays as `.base_layer`, peft's convention, so
the model's module names keep pointing at it). The wrapper holds every loaded adapter's
matrices stacked by slot: A as [slots, R, in] and B as [slots, R, out], the scaling folded
into B, slot 0 all zeros for rows on the base model, adapters of a smaller rank padded with
zeros to the largest rank R loaded on that layer (zero rows and columns add nothing).

Before each forward, `MultiLora.select` turns the rows' adapter ids into a slot per row,
once for every layer. A layer then computes base(x) plus:
- nothing, when no row uses an adapter that adapts this layer (the whole batch on the
  base model costs what the bare model costs);
- x @ A^T @ B with plain matmuls when every row uses the same adapter;
- otherwise, per row, gathered matrices: bmm(x, A[slot]^T) then bmm(., B[slot]), two
  index_selects and two batched matmuls whatever the number of adapters in the batch.

Not thread-safe: one thread (the scheduler's) owns the model, selects and runs forwards."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


class Mode(enum.Enum):
    BASE = 0  # no row uses an adapter
    SINGLE = 1  # every row uses `Selection.slot`
    MIXED = 2  # row i uses `Selection.index[i]`


class Selection:
    """Which slot each row of the next forward uses: shared by every wrapped layer."""

    def __init__(self) -> None:
        self.mode = Mode.BASE
        self.slot = 0
        self.index: torch.Tensor | None = None  # [rows] slot ids, for MIXED
        self.active: frozenset[int] = frozenset()  # the slots some row uses
        # Bumped whenever `index` or any slot's weights change: layers keep the matrices
        # they gathered for the rows until then (rows join and leave between steps only,
        # so most steps gather nothing).
        self.version = 0


@dataclass(frozen=True)
class LoraPair:
    """One layer's LoRA in peft's layout: a [r, in] and b [out, r] (for an embedding, a is
    [r, vocabulary] and b [width, r]), and the scaling that multiplies b @ a."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


class _Stacked(nn.Module):
    """Per-slot stacks of one layer and the slot bookkeeping common to both wrappers."""

    def __init__(
        self, base: nn.Module, selection: Selection, in_dim: int, out_dim: int, name: str = ""
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.layer_name = name  # the module's name in the model, for errors
        self._selection = selection
        weight = base.weight
        assert isinstance(weight, torch.Tensor)
        # Plain attributes, not buffers: the model's state_dict stays the base model's.
        self.lora_a = weight.new_zeros(1, 0, in_dim)  # [slots, R, in]
        self.lora_b = weight.new_zeros(1, 0, out_dim)  # [slots, R, out]
        self.ranks: dict[int, int] = {}  # slot -> rank of the adapter there
        # The matrices gathered for the rows of a MIXED selection, at its version; dropped
        # as soon as a forward needs none (one adapter or none for the whole batch).
        self._rows: tuple[int, tuple[torch.Tensor, ...]] | None = None

    def _gathered(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`_gather(index)`, kept until the selection version changes."""
        version = self._selection.version
        if self._rows is None or self._rows[0] != version:
            self._rows = None  # free the old ones before gathering the new
            self._rows = (version, self._gather(index))
        return self._rows[1]

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The per-row matrices this layer's MIXED forward uses."""
        raise NotImplementedError

    def _check_rows(self, x: torch.Tensor, rows: int) -> None:
        if x.shape[0] != rows:
            raise RuntimeError(
                f"LoRA layer {self.layer_name or type(self.base_layer).__name__}: the input has "
                f"{x.shape[0]} rows but the adapters were selected for {rows}"
            )

    def put(self, slot: int, pair: LoraPair) -> None:
        """Write one adapter's matrices into `slot` (growing the stacks if needed)."""
        rank = pair.a.shape[0]
        self._grow(slot + 1, rank)
        a, b = self.lora_a, self.lora_b
        a[slot].zero_()
        b[slot].zero_()
        a[slot, :rank] = pair.a.to(device=a.device, dtype=a.dtype)
        scaled = pair.b.to(device=b.device, dtype=torch.float32) * pair.scaling
        b[slot, :rank] = scaled.T.to(b.dtype)
        self.ranks[slot] = rank
        self._rows = None

    def reserve(self, slots: int) -> None:
        """Room for slot ids below `slots`: any row's slot may be gathered on any layer."""
        self._grow(slots, 0)

    def clear(self, slot: int) -> None:
        if self.ranks.pop(slot, None) is not None:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            self._rows = None

    def _grow(self, slots: int, rank: int) -> None:
        have_slots, have_rank = self.lora_a.shape[0], self.lora_a.shape[1]
        if slots <= have_slots and rank <= have_rank:
            return
        new_slots, new_rank = max(slots, have_slots), max(rank, have_rank)
        for name in ("lora_a", "lora_b"):
            old: torch.Tensor = getattr(self, name)
            new = old.new_zeros(new_slots, new_rank, old.shape[2])
            new[:have_slots, :have_rank] = old
            setattr(self, name, new)
        self._rows = None

    def _slot_in_use(self) -> int | None:
        """The one slot every row uses (0 = none of this layer's adapters), or None when
        the rows need gathering. Matrices gathered for earlier rows are dropped when none
        are needed."""
        sel = self._selection
        if sel.mode is Mode.MIXED and not sel.active.isdisjoint(self.ranks):
            return None
        self._rows = None
        if sel.mode is Mode.SINGLE and sel.slot in self.ranks:
            return sel.slot
        return 0


class BatchedLoraLinear(_Stacked):
    """nn.Linear or transformers' Conv1D (GPT-2, weight stored [in, out]) plus per-row LoRA.
    peft's LoRA matrices are the same for both (fan_in_fan_out only changes how peft would
    merge them), so the delta is x @ A^T @ B either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base_layer(x)
        slot = self._slot_in_use()
        if slot == 0:
            return y
        out = y.shape[-1]
        if slot is not None:  # one adapter for the whole batch: plain matmuls
            rank = self.ranks[slot]
            h = x.reshape(-1, x.shape[-1]) @ self.lora_a[slot, :rank].T
            return y.view(-1, out).addmm_(h, self.lora_b[slot, :rank]).view(y.shape)
        index = self._selection.index
        assert index is not None
        rows = index.shape[0]
        self._check_rows(x, rows)
        a, b = self._gathered(index)
        h = torch.bmm(x.reshape(rows, -1, x.shape[-1]), a)
        return y.view(rows, -1, out).baddbmm_(h, b).view(y.shape)

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A[slot]^T [rows, in, R] and B[slot] [rows, R, out] of every row."""
        return self.lora_a.index_select(0, index).mT, self.lora_b.index_select(0, index)


class BatchedLoraEmbedding(_Stacked):
    """nn.Embedding plus per-row LoRA: the rows of A^T for the tokens, then B."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base_layer(ids)
        slot = self._slot_in_use()
        if slot == 0:
            return y
        width = y.shape[-1]
        if slot is not None:
            rank = self.ranks[slot]
            h = self.lora_a[slot, :rank].T[ids.reshape(-1)]  # [tokens, rank]
            return y.view(-1, width).addmm_(h, self.lora_b[slot, :rank]).view(y.shape)
        index = self._selection.index
        assert index is not None
        rows = index.shape[0]
        self._check_rows(ids, rows)
        tokens = ids.reshape(rows, -1)
        h = self.lora_a.mT[index[:, None], tokens]  # [rows, tokens, R]: A^T's rows, per token
        (b,) = self._gathered(index)
        return y.view(rows, -1, width).baddbmm_(h, b).view(y.shape)

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """B[slot] [rows, R, width] of every row: A is indexed by token on each forward,
        so it is never gathered whole ([rows, R, vocabulary] would be large)."""
        return (self.lora_b.index_select(0, index),)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a layer LoRA can adapt; for an embedding (vocabulary, width)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is [in, out]
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0]), int(weight.shape[1])
    raise TypeError(f"LoRA on a {type(module).__name__} layer cannot be served")


class MultiLora:
    """The adapters loaded onto one base model, each in a slot of every layer it adapts.
    Layers are wrapped when the first adapter that adapts them arrives and unwrapped when
    the last one leaves, so with no adapter loaded the model is exactly the bare model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._device = next(model.parameters()).device
        self._selection = Selection()
        self._slots: dict[str, int] = {}  # adapter -> slot (1, 2, ...)
        self._layers: dict[str, _Stacked] = {}  # module name -> wrapper
        self._last: tuple[int, ...] = ()  # the slots of the last MIXED selection

    @property
    def adapters(self) -> list[str]:
        return list(self._slots)

    def layers_of(self, adapter_id: str) -> list[str]:
        """The names of the layers `adapter_id` adapts."""
        slot = self._slots.get(adapter_id)
        return [name for name, layer in self._layers.items() if slot in layer.ranks]

    def add(self, adapter_id: str, pairs: Mapping[str, LoraPair]) -> None:
        """Load an adapter whose matrices were already checked against the model's layers
        (`pairs`: module name -> matrices). On any failure nothing of it stays."""
        if adapter_id in self._slots:
            raise ValueError(f"adapter {adapter_id!r} is already loaded")
        slot = min(set(range(1, len(self._slots) + 2)) - set(self._slots.values()))
        self._slots[adapter_id] = slot
        self._last = ()
        try:
            for name, pair in pairs.items():
                self._layer(name).put(slot, pair)
            slots = max(self._slots.values()) + 1
            for layer in self._layers.values():
                layer.reserve(slots)
        except BaseException:
            self.remove(adapter_id)
            raise

    def remove(self, adapter_id: str) -> None:
        slot = self._slots.pop(adapter_id, None)
        if slot is None:
            return
        for name, layer in list(self._layers.items()):
            layer.clear(slot)
            if not layer.ranks:
                self._unwrap(name)
        self._last = ()

    def select(self, adapter_ids: Sequence[str]) -> None:
        """Set which adapter each row of the next forward uses ("" the base model)."""
        sel = self._selection
        slots = tuple(self._slots[a] if a else 0 for a in adapter_ids)
        distinct = set(slots)
        if len(distinct) == 1:
            sel.slot = slots[0] if slots else 0
            sel.mode = Mode.SINGLE if sel.slot else Mode.BASE
            return
        if not distinct:
            sel.mode = Mode.BASE
            return
        sel.mode = Mode.MIXED
        if slots != self._last or sel.index is None:  # rows join and leave between steps only
            sel.index = torch.tensor(slots, device=self._device)
            sel.active = frozenset(distinct - {0})
            sel.version += 1
            self._last = slots

    # --- internals

    def _layer(self, name: str) -> _Stacked:
        layer = self._layers.get(name)
        if layer is not None:
            return layer
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        base = getattr(parent, child)
        in_dim, out_dim = layer_features(base)
        cls = BatchedLoraEmbedding if isinstance(base, nn.Embedding) else BatchedLoraLinear
        layer = cls(base, self._selection, in_dim, out_dim, name)
        setattr(parent, child, layer)
        self._layers[name] = layer
        return layer

    def _unwrap(self, name: str) -> None:
        layer = self._layers.pop(name)
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, layer.base_layer)


def base_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """The model's modules by name, a wrapped layer as the layer it wraps."""
    for name, module in model.named_modules():
        if not name.endswith("base_layer"):
            yield name, getattr(module, "base_layer", module)
