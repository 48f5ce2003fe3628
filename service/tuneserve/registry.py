"""The adapter registry: one directory per adapter under a root, PEFT safetensors plus our
metadata file. An adapter appears whole or not at all: it is written to a staging directory
and renamed into place; deletion renames it away before removing it.

`AdapterRegistry` is thread-safe. Shared storage (a ReadWriteMany volume, S3) slots in behind
the same methods."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneserve.errors import AlreadyExists, NotFound
from tuneserve.jobs.model import check_adapter_id

METADATA_FILE = "tuneserve.json"


@dataclass(frozen=True, kw_only=True)
class AdapterInfo:
    id: str
    base_model: str
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    source_job_id: str
    final_loss: float
    steps: int
    trained_tokens: int
    created_at: float = field(default_factory=time.time)
    size_bytes: int = 0
    parent_adapter_id: str = ""
    eval_loss: float | None = None
    task: str = "causal_lm"
    labels: tuple[str, ...] = ()
    use_dora: bool = False


class AdapterRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = root / ".staging"
        self._trash = root / ".trash"
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a crash mid-write or mid-delete are never visible adapters.
        for leftovers in (self._staging, self._trash):
            shutil.rmtree(leftovers, ignore_errors=True)
            leftovers.mkdir()

    def staging_dir(self) -> Path:
        """A fresh directory to write an adapter into before `register` moves it."""
        path = self._staging / uuid.uuid4().hex
        path.mkdir()
        return path

    def register(self, staging: Path, info: AdapterInfo) -> AdapterInfo:
        """Move a fully written adapter into place under `info.id`."""
        check_adapter_id(info.id)
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        info = AdapterInfo(**{**asdict(info), "size_bytes": size})
        meta = staging / METADATA_FILE
        meta.write_text(json.dumps(asdict(info), indent=2))
        _fsync_dir_files(staging)
        with self._lock:
            target = self.root / info.id
            if target.exists():
                raise AlreadyExists(f"adapter {info.id!r} already exists", field="adapter_id")
            staging.rename(target)
        return info

    def exists(self, adapter_id: str) -> bool:
        return (self.root / check_adapter_id(adapter_id) / METADATA_FILE).is_file()

    def get(self, adapter_id: str) -> AdapterInfo:
        path = self.root / check_adapter_id(adapter_id) / METADATA_FILE
        try:
            return _load_info(json.loads(path.read_text()))
        except FileNotFoundError:
            raise NotFound(f"adapter {adapter_id!r} not found", field="adapter_id") from None

    def path(self, adapter_id: str) -> Path:
        self.get(adapter_id)
        return self.root / adapter_id

    def list(self) -> list[AdapterInfo]:
        infos = []
        for meta in self.root.glob(f"*/{METADATA_FILE}"):
            if not meta.parent.name.startswith("."):
                infos.append(_load_info(json.loads(meta.read_text())))
        return sorted(infos, key=lambda i: i.created_at, reverse=True)

    def delete(self, adapter_id: str) -> None:
        with self._lock:
            self.get(adapter_id)
            doomed = self._trash / f"{adapter_id}-{uuid.uuid4().hex}"
            (self.root / adapter_id).rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _load_info(d: dict[str, Any]) -> AdapterInfo:
    return AdapterInfo(
        **{**d, "target_modules": tuple(d["target_modules"]), "labels": tuple(d.get("labels", ()))}
    )


def _fsync_dir_files(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
