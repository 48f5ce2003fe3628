"""The adapter registry: which adapters exist (an index in the job store, shared by every
replica) and their files (PEFT safetensors plus our metadata file, in the artifact store under
an immutable, versioned key `adapters/<id>/<version>`).

Publishing uploads the files first, then commits the index row; a trained adapter's row is
committed by the same transaction that marks its job SUCCEEDED (`register(..., job=)`), so
it appears exactly once and only whole. A retrain under a deleted id gets a new version and
so a new key: no replica can confuse it with the old files.

Replicas read an adapter's files through a bounded local cache (`ArtifactCache`), pulled
from the artifact store on first use; with a local artifact store they are read in place.
A delete removes the row first (from then on no replica serves it: each checks the index
on every request), then the files.

One damaged entry (metadata that cannot be an adapter's) never poisons the rest: `list`
leaves it out with a warning, `get` says it is damaged (FailedPrecondition), `delete`
removes it. What `register` writes is checked the same way first.

`AdapterRegistry` is thread-safe."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneserve.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from tuneserve.storage.artifacts import ArtifactStore, LocalArtifactStore
from tuneserve.storage.cache import ArtifactCache
from tuneserve.vocabulary import Task, check_adapter_id

if TYPE_CHECKING:
    from tuneserve.jobs.model import Job

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


@dataclass(frozen=True, kw_only=True)
class AdapterRecord:
    """One published adapter: its metadata (the registry's AdapterInfo as JSON), where its
    files are (an artifact key, immutable) and the version that key names. A retrain under
    the same id is a new version with a new key."""

    id: str
    version: str
    key: str
    info: str  # JSON
    source_job_id: str
    created_at: float


class AdapterIndex(Protocol):
    """Where adapters are indexed: the job store (tuneserve.jobs.store.JobStore implements
    it), so that a trained adapter's row commits with its job's end."""

    def publish(self, job: Job, record: AdapterRecord) -> AdapterRecord: ...

    def add_adapter(self, record: AdapterRecord) -> AdapterRecord: ...

    def get_adapter(self, adapter_id: str) -> AdapterRecord | None: ...

    def list_adapters(self) -> list[AdapterRecord]: ...

    def delete_adapter(self, adapter_id: str) -> AdapterRecord | None: ...


def adapter_key(adapter_id: str, version: str) -> str:
    return f"adapters/{adapter_id}/{version}"


class AdapterRegistry:
    def __init__(
        self,
        *,
        index: AdapterIndex,
        artifacts: ArtifactStore,
        cache: ArtifactCache,
        staging_root: Path,
    ) -> None:
        self._index = index
        self._artifacts = artifacts
        self._cache = cache
        self._staging = staging_root
        self._lock = threading.Lock()
        # Damaged entries already warned about: id -> version.
        self._warned: dict[str, str] = {}
        # Leftovers of a crash mid-write are never adapters.
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir(parents=True)

    @property
    def cache(self) -> ArtifactCache:
        return self._cache

    @property
    def staging_root(self) -> Path:
        return self._staging

    def staging_dir(self) -> Path:
        """A fresh directory to write an adapter into before `register` publishes it."""
        path = self._staging / uuid.uuid4().hex
        path.mkdir()
        return path

    def register(self, staging: Path, info: AdapterInfo, *, job: Job | None = None) -> AdapterInfo:
        """Publish a fully written adapter under `info.id`: upload, then index. With `job`
        (claimed, its final state set), the index row and the job's end commit together,
        under the job's claim (LeaseLost when it is gone); a job that already published it
        gets that adapter back. AlreadyExists when another adapter has the id. `info` must
        hold values an adapter can have (ValueError). `staging` is consumed."""
        check_adapter_id(info.id)
        meta = staging / METADATA_FILE  # an imported adapter's old one: replaced, not counted
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file() and p != meta)
        info = AdapterInfo(**{**asdict(info), "size_bytes": size})
        text = json.dumps(asdict(info), indent=2)
        try:
            _load_info(json.loads(text), info.id)
        except _Damaged as e:
            raise ValueError(f"adapter {info.id!r} cannot be registered: {e}") from None
        (staging / METADATA_FILE).write_text(text)
        version = uuid.uuid4().hex[:16]
        record = AdapterRecord(
            id=info.id,
            version=version,
            key=adapter_key(info.id, version),
            info=text,
            source_job_id=info.source_job_id,
            created_at=info.created_at,
        )
        try:
            self._artifacts.put_dir(record.key, staging)
            if job is not None:
                published = self._index.publish(job, record)
            else:
                published = self._index.add_adapter(record)
        except Unavailable:
            # The commit's answer may have been lost with the commit done: the files stay
            # (unreferenced ones are harmless), never deleted from under a published row.
            raise
        except BaseException:
            self._delete_files(record.key)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if published.key != record.key:  # this job had published it already
            self._delete_files(record.key)
            log.info("adapter %s was already published by job %s", info.id, info.source_job_id)
            return self.info_of(published)
        return info

    def exists(self, adapter_id: str) -> bool:
        return self._index.get_adapter(check_adapter_id(adapter_id)) is not None

    def get(self, adapter_id: str) -> AdapterInfo:
        """NotFound if there is no such adapter; FailedPrecondition if it is damaged."""
        return self.info_of(self.record(adapter_id))

    def record(self, adapter_id: str) -> AdapterRecord:
        """The adapter's index row (its version and key): NotFound when there is none."""
        record = self._index.get_adapter(check_adapter_id(adapter_id))
        if record is None:
            raise NotFound(f"adapter {adapter_id!r} not found", field="adapter_id")
        return record

    def path(self, adapter_id: str) -> Path:
        """A local directory holding the adapter's files (pulled on first use)."""
        return self.files_of(self.record(adapter_id))

    def files_of(self, record: AdapterRecord) -> Path:
        """`path` for a record already read (one index lookup per request, not three)."""
        self.info_of(record)  # FailedPrecondition for a damaged entry
        return self._cache.path(record.key)

    def list(self) -> list[AdapterInfo]:
        """Every readable adapter, newest first; a damaged one is left out (and logged)."""
        infos = []
        for record in self._index.list_adapters():
            try:
                infos.append(_load_info(_parse(record.info), record.id))
            except _Damaged as e:
                self._warn_damaged(record, e)
        return sorted(infos, key=lambda i: i.created_at, reverse=True)

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter, a damaged one too: the row first, so no replica serves it
        from then on, then its files."""
        record = self._index.delete_adapter(check_adapter_id(adapter_id))
        if record is None:
            raise NotFound(f"adapter {adapter_id!r} not found", field="adapter_id")
        with self._lock:
            self._warned.pop(adapter_id, None)
        self._delete_files(record.key)

    # --- internals

    def info_of(self, record: AdapterRecord) -> AdapterInfo:
        """A record's metadata, checked: FailedPrecondition if it is damaged."""
        try:
            return _load_info(_parse(record.info), record.id)
        except _Damaged as e:
            raise FailedPrecondition(
                f"adapter {record.id!r} is damaged ({e}); delete it, then train or import it again",
                field="adapter_id",
            ) from None

    def _delete_files(self, key: str) -> None:
        self._cache.forget(key)
        try:
            self._artifacts.delete(key)
        except Exception as e:  # unreferenced files: harmless, and logged
            log.warning("adapter files at %s were not deleted (%s)", key, e)

    def _warn_damaged(self, record: AdapterRecord, error: _Damaged) -> None:
        """Once per entry and version."""
        with self._lock:
            if self._warned.get(record.id) == record.version:
                return
            self._warned[record.id] = record.version
        log.warning("adapter %s is damaged and left out of the list: %s", record.id, error)


def local_registry(root: Path, index: AdapterIndex | None = None) -> AdapterRegistry:
    """A registry on one machine: files under `root/artifacts`, the index in `index` (or an
    SQLite file under `root`). Tests and tools use it; the server builds its own (app.py)."""
    if index is None:
        from tuneserve.jobs.store_sqlite import SQLiteJobStore

        index = SQLiteJobStore(root / "index.sqlite3")
    artifacts = LocalArtifactStore(root / "artifacts")
    return AdapterRegistry(
        index=index,
        artifacts=artifacts,
        cache=ArtifactCache(artifacts, root / "cache", max_bytes=1 << 40),
        staging_root=root / "staging",
    )


def import_legacy_adapters(directory: Path, registry: AdapterRegistry) -> int:
    """Adapters of the single-process releases (one directory each under `directory`, with
    their metadata file) move into the registry; each directory is removed once its adapter
    is indexed. Returns how many moved."""
    moved = 0
    if not directory.is_dir():
        return moved
    for meta in sorted(directory.glob(f"*/{METADATA_FILE}")):
        entry = meta.parent
        if entry.name.startswith("."):
            continue
        try:
            info = _load_info(_parse(meta.read_text()), entry.name)
        except (OSError, _Damaged) as e:
            log.warning("old adapter directory %s is damaged and left in place: %s", entry, e)
            continue
        if registry.exists(info.id):
            continue
        staging = registry.staging_dir()
        shutil.copytree(entry, staging, dirs_exist_ok=True)
        registry.register(staging, info)
        shutil.rmtree(entry, ignore_errors=True)
        moved += 1
    return moved


def _parse(text: str) -> Any:
    if len(text) > MAX_METADATA_BYTES:
        raise _Damaged(f"{METADATA_FILE} is larger than {MAX_METADATA_BYTES} bytes")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _Damaged(f"{METADATA_FILE} is not JSON: {e}") from None


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
