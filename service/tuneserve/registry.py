"""The adapter registry: one directory per adapter under a root, PEFT safetensors plus our
metadata file. An adapter appears whole or not at all: it is written to a staging directory
and renamed into place; deletion renames it away before removing it.

Publishing is idempotent for the job that owns the adapter: a job that registered its
adapter and was killed before it was marked SUCCEEDED registers it again after the restart
and gets the adapter back, not ALREADY_EXISTS.

One damaged entry (a metadata file unreadable, not JSON, or with values no adapter has)
never poisons the rest: `list` leaves it out with a warning, `get` says it is damaged
(FailedPrecondition), `delete` removes it. What `register` writes is checked the same way
first, so it never writes such an entry.

`AdapterRegistry` is thread-safe. Shared storage (a ReadWriteMany volume, S3) slots in behind
the same methods."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneserve.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tuneserve.jobs.model import Task, check_adapter_id

log = logging.getLogger(__name__)

METADATA_FILE = "tuneserve.json"
MAX_METADATA_BYTES = 1 << 20
_UINT32 = 2**32 - 1  # the API's r; its steps, tokens and sizes are 64-bit
_UINT64 = 2**64 - 1


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
        # Damaged entries already warned about, by name: (mtime_ns, size) of the file then.
        self._warned: dict[str, tuple[int, int]] = {}
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
        """Move a fully written adapter into place under `info.id`. If that id is taken by
        an adapter of the same job (`info.source_job_id`, when not empty), the job already
        published it: `staging` is dropped and that adapter returned. Otherwise a taken id
        is AlreadyExists. `info` must hold values an adapter can have (ValueError)."""
        check_adapter_id(info.id)
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        info = AdapterInfo(**{**asdict(info), "size_bytes": size})
        text = json.dumps(asdict(info), indent=2)
        try:
            _load_info(json.loads(text), info.id)
        except _Damaged as e:
            raise ValueError(f"adapter {info.id!r} cannot be registered: {e}") from None
        (staging / METADATA_FILE).write_text(text)
        _fsync_dir_files(staging)
        with self._lock:
            target = self.root / info.id
            if target.exists():
                published = self._published_by(info.source_job_id, info.id)
                if published is None:
                    raise AlreadyExists(f"adapter {info.id!r} already exists", field="adapter_id")
                shutil.rmtree(staging, ignore_errors=True)
                log.info("adapter %s was already published by job %s", info.id, info.source_job_id)
                return published
            staging.rename(target)
            _fsync_dir(self.root)
        return info

    def exists(self, adapter_id: str) -> bool:
        return (self.root / check_adapter_id(adapter_id) / METADATA_FILE).is_file()

    def get(self, adapter_id: str) -> AdapterInfo:
        """NotFound if there is no such adapter; FailedPrecondition if it is damaged."""
        check_adapter_id(adapter_id)
        try:
            return self._read(adapter_id)
        except FileNotFoundError:
            raise NotFound(f"adapter {adapter_id!r} not found", field="adapter_id") from None
        except _Damaged as e:
            raise FailedPrecondition(
                f"adapter {adapter_id!r} is damaged ({e}); delete it, then train or import it "
                "again",
                field="adapter_id",
            ) from None

    def path(self, adapter_id: str) -> Path:
        self.get(adapter_id)
        return self.root / adapter_id

    def list(self) -> list[AdapterInfo]:
        """Every readable adapter, newest first; a damaged one is left out (and logged)."""
        infos = []
        for meta in self.root.glob(f"*/{METADATA_FILE}"):
            name = meta.parent.name
            if name.startswith("."):
                continue
            try:
                infos.append(self._read(name))
            except FileNotFoundError:
                continue  # deleted meanwhile
            except _Damaged as e:
                self._warn_damaged(name, meta, e)
        return sorted(infos, key=lambda i: i.created_at, reverse=True)

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter, a damaged one too."""
        with self._lock:
            source = self.root / check_adapter_id(adapter_id)
            if not source.is_dir():
                raise NotFound(f"adapter {adapter_id!r} not found", field="adapter_id")
            doomed = self._trash / f"{adapter_id}-{uuid.uuid4().hex}"
            source.rename(doomed)
            self._warned.pop(adapter_id, None)
        shutil.rmtree(doomed, ignore_errors=True)

    # --- internals

    def _read(self, name: str) -> AdapterInfo:
        """The entry's metadata; FileNotFoundError when there is none, _Damaged when it
        cannot be an adapter's."""
        path = self.root / name / METADATA_FILE
        try:
            if path.stat().st_size > MAX_METADATA_BYTES:
                raise _Damaged(f"{METADATA_FILE} is larger than {MAX_METADATA_BYTES} bytes")
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise
        except OSError as e:
            raise _Damaged(f"{METADATA_FILE} cannot be read: {e.strerror}") from None
        except (ValueError, RecursionError) as e:
            raise _Damaged(f"{METADATA_FILE} is not JSON: {e}") from None
        return _load_info(data, name)

    def _published_by(self, job_id: str, adapter_id: str) -> AdapterInfo | None:
        """The adapter under `adapter_id` if job `job_id` published it."""
        if not job_id:
            return None
        try:
            existing = self._read(adapter_id)
        except (OSError, _Damaged):
            return None
        return existing if existing.source_job_id == job_id else None

    def _warn_damaged(self, name: str, meta: Path, error: _Damaged) -> None:
        """Once per entry, and again if its file changes."""
        try:
            st = meta.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (0, 0)
        with self._lock:
            if self._warned.get(name) == stamp:
                return
            self._warned[name] = stamp
        log.warning("adapter %s is damaged and left out of the list: %s", name, error)


class _Damaged(ValueError):
    """Metadata that cannot be an adapter's."""


def _load_info(data: object, name: str) -> AdapterInfo:
    """An AdapterInfo from the JSON of entry `name`, every value checked: what is listed
    and served must fit the API's types and never break a later computation."""
    if not isinstance(data, dict):
        raise _Damaged(f"{METADATA_FILE} holds a {type(data).__name__}, not an object")
    fields = {f.name: f for f in dataclasses.fields(AdapterInfo)}
    required = {
        f.name
        for f in fields.values()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - data.keys())
    if missing:
        raise _Damaged(f"{METADATA_FILE} has no {', '.join(missing)}")
    d = {k: v for k, v in data.items() if k in fields}  # a newer version's extras ignored

    def bad(key: str, what: str) -> _Damaged:
        return _Damaged(f"{key} is {str(d[key])[:40]!r}; it must be {what}")

    for key in ("id", "base_model", "source_job_id", "parent_adapter_id", "task"):
        if key in d and not isinstance(d[key], str):
            raise bad(key, "a string")
    if d["id"] != name:
        raise bad("id", f"the directory's name, {name!r}")
    try:
        check_adapter_id(name)
    except InvalidArgument:
        raise bad("id", "a valid adapter id") from None
    if d.get("task", Task.CAUSAL_LM.value) not in {t.value for t in Task}:
        raise bad("task", "one of " + ", ".join(t.value for t in Task))
    for key, low, high in (
        ("r", 1, _UINT32),
        ("steps", 0, _UINT64),
        ("trained_tokens", 0, _UINT64),
        ("size_bytes", 0, _UINT64),
    ):
        if key in d and not (_is_int(d[key]) and low <= d[key] <= high):
            raise bad(key, f"a whole number from {low} to {high}")
    if not (_is_number(d["alpha"]) and 0 < d["alpha"] < math.inf):
        raise bad("alpha", "a finite number above 0")
    if not (_is_number(d["dropout"]) and 0 <= d["dropout"] <= 1):
        raise bad("dropout", "a number from 0 to 1")
    if "created_at" in d and not (_is_number(d["created_at"]) and math.isfinite(d["created_at"])):
        raise bad("created_at", "a time")
    if not _is_number(d["final_loss"]):
        raise bad("final_loss", "a number")
    if d.get("eval_loss") is not None and not _is_number(d["eval_loss"]):
        raise bad("eval_loss", "a number or null")
    if "use_dora" in d and not isinstance(d["use_dora"], bool):
        raise bad("use_dora", "true or false")
    for key in ("target_modules", "labels"):
        if key in d:
            if not (isinstance(d[key], list) and all(isinstance(v, str) for v in d[key])):
                raise bad(key, "a list of strings")
            d[key] = tuple(d[key])
    return AdapterInfo(**d)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fsync_dir_files(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
