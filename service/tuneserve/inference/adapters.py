"""The adapter cache: LoRA adapters loaded onto the one base model, least recently used first.
Each loaded adapter takes a slot of the batched LoRA layers (`lora_batch.MultiLora`), so one
forward serves rows on any mix of loaded adapters and the base model (`forward`).

- A new adapter is loaded and validated before anything is evicted; if loading fails, the
  cache is as it was.
- Adapters in use by a running request, and pinned ones, are never evicted. When every
  slot is taken by such adapters, `ensure` says so and the request waits its turn.
- Every hit touches the entry.
- An adapter replaced or deleted on disk while requests run with it (`invalidate`) keeps
  serving those requests, is evicted when the last of them ends, and is never served to a
  new one: that one waits and gets the adapter as it is on disk now.

Not thread-safe: only the scheduler's thread calls it (it owns the model)."""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peft import LoraConfig
from transformers import PreTrainedModel

from tuneserve.errors import FailedPrecondition, InvalidArgument
from tuneserve.inference.lora_batch import MultiLora
from tuneserve.inference.lora_files import CONFIG_FILE, ConfigError, read_config, read_lora
from tuneserve.registry import AdapterInfo, AdapterRegistry
from tuneserve.vocabulary import Task

log = logging.getLogger(__name__)


class AdapterCache:
    def __init__(
        self, *, model: PreTrainedModel, registry: AdapterRegistry, base_model: str, capacity: int
    ) -> None:
        self.model = model
        self._lora = MultiLora(model)
        self._registry = registry
        self._base_model = base_model
        self._capacity = capacity
        # LRU first; the value is the registry version the loaded matrices came from.
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self._in_use: Counter[str] = Counter()
        self._pinned: set[str] = set()
        self._stale: set[str] = set()  # loaded, but changed on disk since: evict when unused
        self.loads = 0
        self.evictions = 0

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def version_of(self, adapter_id: str) -> str | None:
        """The registry version loaded under `adapter_id` (None: not loaded). Any thread."""
        return self._loaded.get(adapter_id)

    @property
    def pinned(self) -> set[str]:
        return set(self._pinned)

    def ensure(self, adapter_id: str) -> bool:
        """Make `adapter_id` loaded and touch it. False when the cache is full of adapters
        that may not be evicted right now (the caller retries later)."""
        if not adapter_id:
            return True
        if adapter_id in self._stale:
            if self._in_use[adapter_id]:
                return False  # its old matrices serve running requests: wait for them
            self._evict(adapter_id)  # then load it as it is on disk now
        if adapter_id in self._loaded:
            self._loaded.move_to_end(adapter_id)
            return True
        if len(self._loaded) >= self._capacity and self._victim() is None:
            if all(name in self._pinned and not self._in_use[name] for name in self._loaded):
                raise FailedPrecondition(
                    f"all {self._capacity} adapter slots are pinned; unload one first",
                    field="adapter_id",
                )
            return False  # slots busy with running requests: wait for one to finish
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
                if adapter_id in self._stale:
                    self._evict(adapter_id)

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

    def invalidate(self, adapter_id: str) -> None:
        """The adapter was replaced or deleted on disk: unload it now, or, while requests
        run with it, as soon as the last of them ends; no new request is served the
        matrices loaded before."""
        self._pinned.discard(adapter_id)
        if adapter_id not in self._loaded:
            return
        if self._in_use[adapter_id]:
            self._stale.add(adapter_id)
        else:
            self._evict(adapter_id)

    def forward(self, adapter_ids: list[str], **inputs: Any) -> Any:
        """One forward of the model, row i through adapter `adapter_ids[i]` ("" the base
        model); every adapter named must be loaded."""
        self._lora.select(adapter_ids)
        return self.model(**inputs)

    def layers_of(self, adapter_id: str) -> list[str]:
        """The model's layers that carry `adapter_id` (none when it is not loaded)."""
        return self._lora.layers_of(adapter_id)

    # --- internals

    def _victim(self) -> str | None:
        for name in self._loaded:  # least recently used first
            if not self._in_use[name] and name not in self._pinned:
                return name
        return None

    def _load(self, adapter_id: str) -> None:
        record = self._registry.record(adapter_id)
        check_servable(self._registry.info_of(record), self._base_model)
        directory = self._registry.files_of(record)
        # Every matrix is read and checked against the model before the first is written
        # into a slot: a misfit never touches the model.
        self._lora.add(adapter_id, read_lora(adapter_id, directory, self.model))
        self._loaded[adapter_id] = record.version
        self.loads += 1
        log.info("adapter %s loaded", adapter_id)

    def _evict(self, adapter_id: str) -> None:
        self._lora.remove(adapter_id)
        del self._loaded[adapter_id]
        self._stale.discard(adapter_id)
        self.evictions += 1
        log.info("adapter %s evicted", adapter_id)


def check_servable(info: AdapterInfo, base_model: str, path: Path | None = None) -> None:
    """A generation adapter trained on this server's base model."""
    if info.task != Task.CAUSAL_LM.value:
        raise FailedPrecondition(
            f"adapter {info.id!r} is a classifier; use Classify", field="adapter_id"
        )
    if info.use_dora:
        raise FailedPrecondition(
            f"adapter {info.id!r} uses DoRA, which cannot be batched with other adapters; "
            "serve a LoRA adapter (train without use_dora)",
            field="adapter_id",
        )
    if info.base_model != base_model:
        raise FailedPrecondition(
            f"adapter {info.id!r} was trained on {info.base_model}, "
            f"but this server serves {base_model}",
            field="adapter_id",
        )


def read_lora_config(directory: Path) -> LoraConfig:
    """adapter_config.json of a LoRA adapter for text generation, parsed and checked whole
    (`lora_files.read_config`), or InvalidArgument on "path" naming the field at fault."""
    try:
        return read_config(directory)
    except ConfigError as e:
        raise InvalidArgument(f"path: {CONFIG_FILE}: {e}", field="path") from None


def imported_info(
    *, adapter_id: str, base_model: str, config: LoraConfig, layers: Iterable[str]
) -> AdapterInfo:
    """What the registry records of an imported adapter: its settings as peft reads them
    (peft's defaults included), `layers` the model's layers its matrices adapt."""
    targets = config.target_modules
    if isinstance(targets, str):
        modules: tuple[str, ...] = (targets,)
    elif targets:
        modules = tuple(sorted(targets))
    else:  # peft chose them by architecture: the layers the matrices adapt say which
        modules = tuple(sorted({name.rpartition(".")[2] for name in layers}))
    return AdapterInfo(
        id=adapter_id,
        base_model=base_model,
        r=config.r,
        alpha=float(config.lora_alpha),
        dropout=float(config.lora_dropout),
        target_modules=modules,
        source_job_id="",
        final_loss=0.0,
        steps=0,
        trained_tokens=0,
    )
