"""The adapter cache: LoRA adapters loaded onto the one base model, least recently used first.

- A new adapter is loaded and validated before anything is evicted; if loading fails, the
  cache is as it was.
- Adapters in use by a running request, and pinned ones, are never evicted. When every
  slot is taken by such adapters, `ensure` says so and the request waits its turn.
- Every hit touches the entry.

Not thread-safe: only the scheduler's thread calls it (it owns the model)."""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel

from tuneserve.errors import FailedPrecondition
from tuneserve.jobs.model import Task
from tuneserve.registry import AdapterInfo, AdapterRegistry

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class AdapterCache:
    def __init__(
        self, *, model: PreTrainedModel, registry: AdapterRegistry, base_model: str, capacity: int
    ) -> None:
        self.model: PreTrainedModel | PeftModel = model
        self._registry = registry
        self._base_model = base_model
        self._capacity = capacity
        self._loaded: OrderedDict[str, None] = OrderedDict()  # LRU first
        self._in_use: Counter[str] = Counter()
        self._pinned: set[str] = set()
        self.loads = 0
        self.evictions = 0

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    @property
    def pinned(self) -> set[str]:
        return set(self._pinned)

    def ensure(self, adapter_id: str) -> bool:
        """Make `adapter_id` loaded and touch it. False when the cache is full of adapters
        that may not be evicted right now (the caller retries later)."""
        if not adapter_id:
            return True
        if adapter_id in self._loaded:
            self._loaded.move_to_end(adapter_id)
            return True
        if len(self._loaded) >= self._capacity and self._victim() is None:
            return False
        self._load(adapter_id)
        while len(self._loaded) > self._capacity:
            victim = self._victim()
            assert victim is not None
            self._evict(victim)
        return True

    def acquire(self, adapter_id: str) -> None:
        if adapter_id:
            self._in_use[adapter_id] += 1

    def release(self, adapter_id: str) -> None:
        if adapter_id:
            self._in_use[adapter_id] -= 1
            if self._in_use[adapter_id] <= 0:
                del self._in_use[adapter_id]

    def pin(self, adapter_id: str, pinned: bool) -> None:
        if pinned:
            self._pinned.add(adapter_id)
        else:
            self._pinned.discard(adapter_id)

    def drop(self, adapter_id: str) -> bool:
        """Unload now (an explicit unload, or the adapter was deleted). False if in use."""
        if self._in_use[adapter_id]:
            return False
        self._pinned.discard(adapter_id)
        if adapter_id in self._loaded:
            self._evict(adapter_id)
        return True

    def names(self, adapter_ids: list[str]) -> list[str] | None:
        """The adapter_names argument of a mixed-batch forward (None without adapters)."""
        if not isinstance(self.model, PeftModel):
            return None
        return [a or BASE for a in adapter_ids]

    # --- internals

    def _victim(self) -> str | None:
        for name in self._loaded:  # least recently used first
            if not self._in_use[name] and name not in self._pinned:
                return name
        return None

    def _load(self, adapter_id: str) -> None:
        info = self._registry.get(adapter_id)
        check_servable(info, self._base_model)
        path = str(self._registry.path(adapter_id))
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=adapter_id, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(
                self.model, path, adapter_name=adapter_id, is_trainable=False
            )
        self.model.eval()
        self._loaded[adapter_id] = None
        self.loads += 1
        log.info("adapter %s loaded", adapter_id)

    def _evict(self, adapter_id: str) -> None:
        assert isinstance(self.model, PeftModel)
        if len(self._loaded) == 1:
            self.model = self.model.unload()  # back to the bare base model
        else:
            self.model.delete_adapter(adapter_id)
        del self._loaded[adapter_id]
        self.evictions += 1
        log.info("adapter %s evicted", adapter_id)


def check_servable(info: AdapterInfo, base_model: str, path: Path | None = None) -> None:
    """A generation adapter trained on this server's base model."""
    if info.task != Task.CAUSAL_LM.value:
        raise FailedPrecondition(
            f"adapter {info.id!r} is a classifier; use Classify", field="adapter_id"
        )
    if info.base_model != base_model:
        raise FailedPrecondition(
            f"adapter {info.id!r} was trained on {info.base_model}, "
            f"but this server serves {base_model}",
            field="adapter_id",
        )
