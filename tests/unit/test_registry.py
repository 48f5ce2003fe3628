"""tuneserve.registry: adapters indexed in the job store, their files in the artifact store
under versioned keys. Registration (idempotent for the job that owns the adapter), lookup,
listing and deletion; entries whose index row is damaged poison nothing; adapters of the
single-process releases are imported."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tuneserve.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tuneserve.jobs.model import DatasetFormat, Job, JobSpec, JobState
from tuneserve.jobs.store import AdapterRecord, LeaseLost
from tuneserve.jobs.store_sqlite import SQLiteJobStore
from tuneserve.registry import (
    METADATA_FILE,
    AdapterInfo,
    AdapterRegistry,
    adapter_key,
    import_legacy_adapters,
    local_registry,
)
from tuneserve.storage.artifacts import ArtifactStore, LocalArtifactStore
from tuneserve.storage.cache import ArtifactCache

WEIGHTS = b"\x00" * 1000
CONFIG = b'{"r": 4}'


def info(adapter_id: str, created_at: float = 1000.0, job: str = "job1") -> AdapterInfo:
    return AdapterInfo(
        id=adapter_id,
        base_model="gpt2",
        r=4,
        alpha=8.0,
        dropout=0.05,
        target_modules=("c_attn", "c_proj"),
        source_job_id=job,
        final_loss=1.5,
        steps=10,
        trained_tokens=300,
        created_at=created_at,
    )


def staged(registry: AdapterRegistry, weights: bytes = WEIGHTS) -> Path:
    staging = registry.staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(weights)
    (staging / "adapter_config.json").write_bytes(CONFIG)
    return staging


def add(registry: AdapterRegistry, adapter_id: str, created_at: float = 1000.0) -> AdapterInfo:
    return registry.register(staged(registry), info(adapter_id, created_at))


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


@pytest.fixture()
def artifacts(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


def open_registry(tmp: Path, store: SQLiteJobStore, artifacts: ArtifactStore) -> AdapterRegistry:
    """As app.py builds it."""
    return AdapterRegistry(
        index=store,
        artifacts=artifacts,
        cache=ArtifactCache(artifacts, tmp / "cache", max_bytes=1 << 30),
        staging_root=tmp / "staging",
    )


@pytest.fixture()
def registry(
    tmp_path: Path, store: SQLiteJobStore, artifacts: LocalArtifactStore
) -> AdapterRegistry:
    return open_registry(tmp_path, store, artifacts)


def claimed_job(store: SQLiteJobStore, job_id: str, adapter_id: str) -> Job:
    """A job a worker holds, its end set as the worker sets it before publishing."""
    spec = JobSpec(
        base_model="gpt2", adapter_id=adapter_id, dataset_format=DatasetFormat.TEXT, dataset_rows=1
    ).validate()
    store.insert(Job(id=job_id, spec=spec))
    job = store.claim("test", 60.0)
    assert job is not None and job.id == job_id
    job.state, job.finished_at = JobState.SUCCEEDED, time.time()
    return job


def versions(artifacts: LocalArtifactStore, adapter_id: str) -> list[str]:
    directory = artifacts.root / "adapters" / adapter_id
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_register_uploads_the_staging_directory_under_a_versioned_key(
    registry: AdapterRegistry, store: SQLiteJobStore, artifacts: LocalArtifactStore
) -> None:
    staging = registry.staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (staging / "nested").mkdir()
    (staging / "nested" / "adapter_config.json").write_bytes(CONFIG)
    out = registry.register(staging, info("vader"))

    assert not staging.exists()
    record = store.get_adapter("vader")
    assert record is not None
    assert record.key == adapter_key("vader", record.version)
    assert record.source_job_id == "job1"
    files = artifacts.local_path(record.key)
    assert files is not None
    assert (files / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert (files / "nested" / "adapter_config.json").read_bytes() == CONFIG
    assert out.size_bytes == len(WEIGHTS) + len(CONFIG)
    assert json.loads((files / METADATA_FILE).read_text())["size_bytes"] == out.size_bytes
    assert json.loads(record.info) == json.loads((files / METADATA_FILE).read_text())
    assert registry.get("vader") == out
    assert registry.exists("vader")
    assert registry.record("vader") == record


def test_path_is_a_directory_with_the_files_in_place_on_a_local_store(
    registry: AdapterRegistry, artifacts: LocalArtifactStore
) -> None:
    add(registry, "vader")
    path = registry.path("vader")
    assert path == artifacts.local_path(registry.record("vader").key)  # no copy
    assert (path / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert (path / "adapter_config.json").read_bytes() == CONFIG
    assert json.loads((path / METADATA_FILE).read_text())["id"] == "vader"
    assert registry.cache.bytes == 0


class RemoteStore:
    """A local store seen as object storage is: no local paths, so files are pulled."""

    def __init__(self, inner: LocalArtifactStore) -> None:
        self._inner = inner
        self.url = inner.url
        self.downloads = 0

    def local_path(self, key: str) -> Path | None:
        return None

    def get_dir(self, key: str, dest: Path) -> None:
        self.downloads += 1
        self._inner.get_dir(key, dest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_path_pulls_the_files_into_the_cache_on_first_use_from_a_remote_store(
    tmp_path: Path, store: SQLiteJobStore, artifacts: LocalArtifactStore
) -> None:
    remote = RemoteStore(artifacts)
    registry = open_registry(tmp_path, store, remote)
    add(registry, "vader")
    path = registry.path("vader")
    assert path.is_relative_to(tmp_path / "cache")
    assert (path / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert registry.path("vader") == path
    assert remote.downloads == 1  # pulled once, then read from the cache
    registry.delete("vader")
    assert not path.exists()  # the cached copy goes with it


@pytest.mark.parametrize("by", ["import", "job"])
def test_duplicate_adapter_id_is_rejected_and_the_first_kept(
    registry: AdapterRegistry, store: SQLiteJobStore, artifacts: LocalArtifactStore, by: str
) -> None:
    """Another job's adapter, or an import (no job), never replaces one already there."""
    first = add(registry, "vader")
    job = claimed_job(store, "job2", "vader") if by == "job" else None
    staging = staged(registry, b"other")
    with pytest.raises(AlreadyExists) as exc:
        registry.register(staging, info("vader", created_at=2000.0, job="job2"), job=job)
    assert exc.value.field == "adapter_id"
    assert registry.get("vader") == first
    assert (registry.path("vader") / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert versions(artifacts, "vader") == [registry.record("vader").version]  # upload removed
    assert not staging.exists()
    if job is not None:  # the job's end was not written either
        assert store.get("job2").state is JobState.RUNNING  # type: ignore[union-attr]


def test_publishing_for_a_job_indexes_the_adapter_and_ends_the_job_at_once(
    registry: AdapterRegistry, store: SQLiteJobStore
) -> None:
    job = claimed_job(store, "job1", "vader")
    out = registry.register(staged(registry), info("vader"), job=job)
    assert registry.get("vader") == out
    assert store.get("job1").state is JobState.SUCCEEDED  # type: ignore[union-attr]


def test_publishing_again_for_the_same_job_returns_the_adapter_already_there(
    registry: AdapterRegistry, store: SQLiteJobStore, artifacts: LocalArtifactStore
) -> None:
    """Issue 18 item 2: a job killed between publishing its adapter and being marked
    SUCCEEDED (possible before publishing and the job's end were one transaction; such an
    adapter comes in by import) runs again and publishes again; that must not fail it."""
    first = add(registry, "vader")  # source_job_id job1
    job = claimed_job(store, "job1", "vader")
    staging = staged(registry, b"retrained")
    again = registry.register(staging, info("vader", created_at=2000.0, job="job1"), job=job)
    assert again == first
    assert not staging.exists()
    assert (registry.path("vader") / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert versions(artifacts, "vader") == [registry.record("vader").version]
    assert [i.id for i in registry.list()] == ["vader"]
    assert store.get("job1").state is JobState.SUCCEEDED  # type: ignore[union-attr]


def test_a_publish_whose_claim_is_gone_writes_nothing(
    registry: AdapterRegistry, store: SQLiteJobStore, artifacts: LocalArtifactStore
) -> None:
    job = claimed_job(store, "job1", "vader")
    time.sleep(0.01)
    store.expire_leases("test")
    assert store.claim("other", 60.0) is not None  # another worker took the job
    with pytest.raises(LeaseLost):
        registry.register(staged(registry), info("vader"), job=job)
    assert not registry.exists("vader")
    assert versions(artifacts, "vader") == []  # the upload was removed


def test_unknown_adapter_is_not_found(registry: AdapterRegistry) -> None:
    with pytest.raises(NotFound) as exc:
        registry.get("nobody")
    assert exc.value.field == "adapter_id"
    with pytest.raises(NotFound):
        registry.path("nobody")
    with pytest.raises(NotFound):
        registry.delete("nobody")
    with pytest.raises(NotFound):
        registry.record("nobody")
    assert not registry.exists("nobody")


def test_delete_removes_the_adapter_and_its_files(
    registry: AdapterRegistry, artifacts: LocalArtifactStore
) -> None:
    add(registry, "vader")
    add(registry, "yoda")
    key = registry.record("vader").key
    registry.delete("vader")
    assert not artifacts.exists(key)
    assert versions(artifacts, "vader") == []
    assert not registry.exists("vader")
    with pytest.raises(NotFound):
        registry.get("vader")
    assert [i.id for i in registry.list()] == ["yoda"]
    add(registry, "vader")  # the id is free again
    assert registry.exists("vader")


def test_a_new_version_under_the_same_id_has_a_new_key(
    registry: AdapterRegistry, artifacts: LocalArtifactStore
) -> None:
    """A retrain after a delete: no replica can confuse the new files with the old."""
    add(registry, "vader")
    old = registry.record("vader")
    old_path = registry.path("vader")
    registry.delete("vader")
    registry.register(staged(registry, b"retrained"), info("vader", created_at=2000.0))
    new = registry.record("vader")
    assert new.version != old.version and new.key != old.key
    assert registry.path("vader") != old_path
    assert (registry.path("vader") / "adapter_model.safetensors").read_bytes() == b"retrained"
    assert registry.get("vader").created_at == 2000.0
    assert versions(artifacts, "vader") == [new.version]


def test_list_is_newest_first(registry: AdapterRegistry) -> None:
    add(registry, "middle", created_at=2000.0)
    add(registry, "old", created_at=1000.0)
    add(registry, "new", created_at=3000.0)
    assert [i.id for i in registry.list()] == ["new", "middle", "old"]
    assert registry.list()[0].target_modules == ("c_attn", "c_proj")


def test_an_unregistered_staging_directory_is_never_listed(registry: AdapterRegistry) -> None:
    staging = registry.staging_dir()
    (staging / METADATA_FILE).write_text(json.dumps({"id": "half-written"}))
    assert registry.list() == []
    assert not registry.exists("half-written")


def test_staging_leftovers_of_a_crash_are_cleaned_at_construction(
    tmp_path: Path, store: SQLiteJobStore, artifacts: LocalArtifactStore
) -> None:
    first = open_registry(tmp_path, store, artifacts)
    add(first, "kept")
    crashed_write = first.staging_dir()
    (crashed_write / "adapter_model.safetensors").write_bytes(WEIGHTS)

    second = open_registry(tmp_path, store, artifacts)
    assert not crashed_write.exists()
    assert list(second.staging_root.iterdir()) == []
    assert [i.id for i in second.list()] == ["kept"]


def test_local_registry_keeps_its_index_and_files_under_one_root(tmp_path: Path) -> None:
    first = local_registry(tmp_path / "root")
    add(first, "vader")
    again = local_registry(tmp_path / "root")  # a restart
    assert again.get("vader") == first.get("vader")
    assert again.path("vader").is_relative_to(tmp_path / "root" / "artifacts")


@pytest.mark.parametrize("bad_id", ["../evil", "a/b", "..", ".staging", "Vader", "/etc"])
def test_path_like_ids_are_invalid_arguments(
    registry: AdapterRegistry, tmp_path: Path, bad_id: str
) -> None:
    with pytest.raises(InvalidArgument):
        registry.get(bad_id)
    with pytest.raises(InvalidArgument):
        registry.path(bad_id)
    with pytest.raises(InvalidArgument):
        registry.delete(bad_id)
    with pytest.raises(InvalidArgument):
        registry.exists(bad_id)
    staging = staged(registry)
    with pytest.raises(InvalidArgument):
        registry.register(staging, info(bad_id))
    assert staging.exists()  # nothing was uploaded anywhere
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "artifacts" / "adapters").exists()
    assert registry.list() == []


# --- damaged entries poison nothing


def write_row(
    store: SQLiteJobStore,
    adapter_id: str,
    metadata: str,
    *,
    version: str = "v1",
    artifacts: LocalArtifactStore | None = None,
) -> AdapterRecord:
    """An index row as something other than `register` may have left it (an older or
    newer release, a hand edit), with its files when `artifacts` is given."""
    record = AdapterRecord(
        id=adapter_id,
        version=version,
        key=adapter_key(adapter_id, version),
        info=metadata,
        source_job_id="",
        created_at=1000.0,
    )
    if artifacts is not None:
        (artifacts.root / record.key).mkdir(parents=True)
        (artifacts.root / record.key / "adapter_model.safetensors").write_bytes(WEIGHTS)
    return store.add_adapter(record)


def metadata_of(adapter_id: str, **changes: Any) -> str:
    d = {**dataclasses.asdict(info(adapter_id)), **changes}
    return json.dumps({k: v for k, v in d.items() if v is not ...})


DAMAGE = {
    "not JSON": "{not json",
    "truncated": metadata_of("bad")[:50],
    "a list": "[1, 2]",
    "empty": "",
    "no r": metadata_of("bad", r=...),
    "huge r": metadata_of("bad", r=2**70),
    "boolean r": metadata_of("bad", r=True),
    "infinite alpha": metadata_of("bad", alpha=math.inf),
    "NaN alpha": metadata_of("bad", alpha=math.nan),
    "string alpha": metadata_of("bad", alpha="8"),
    "negative steps": metadata_of("bad", steps=-1),
    "dropout 2": metadata_of("bad", dropout=2.0),
    "modules not strings": metadata_of("bad", target_modules=[1]),
    "unknown task": metadata_of("bad", task="poetry"),
    "another id": metadata_of("other"),
    "NaN created_at": metadata_of("bad", created_at=math.nan),
    "oversized": metadata_of("bad", labels=["x" * 1000] * 1100),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_entry_is_left_out_of_the_list_and_refused_by_get(
    tmp_path: Path,
    registry: AdapterRegistry,
    store: SQLiteJobStore,
    artifacts: LocalArtifactStore,
    damage: str,
) -> None:
    """Issue 18 item 3: one such entry made every ListAdapters fail, across restarts."""
    add(registry, "good")
    write_row(store, "bad", DAMAGE[damage], artifacts=artifacts)
    assert [i.id for i in registry.list()] == ["good"]
    restarted = open_registry(tmp_path, store, artifacts)
    assert [i.id for i in restarted.list()] == ["good"]
    with pytest.raises(FailedPrecondition) as exc:
        registry.get("bad")
    assert exc.value.field == "adapter_id"
    assert "'bad' is damaged" in exc.value.message
    with pytest.raises(FailedPrecondition):
        registry.path("bad")
    assert registry.exists("bad")  # the id is taken until it is deleted


def test_a_damaged_entry_can_be_deleted(
    registry: AdapterRegistry, store: SQLiteJobStore, artifacts: LocalArtifactStore
) -> None:
    record = write_row(store, "bad", "{not json", artifacts=artifacts)
    registry.delete("bad")
    assert not artifacts.exists(record.key)
    with pytest.raises(NotFound):
        registry.get("bad")
    add(registry, "bad")  # the id is free again
    assert registry.get("bad").id == "bad"


def test_a_damaged_entry_is_logged_once_until_it_changes(
    registry: AdapterRegistry, store: SQLiteJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    write_row(store, "bad", "{not json")
    with caplog.at_level(logging.WARNING, logger="tuneserve.registry"):
        for _ in range(3):
            registry.list()
        assert len([r for r in caplog.records if "bad" in r.getMessage()]) == 1
        # Another replica replaces it: a new version, damaged another way.
        store.delete_adapter("bad")
        write_row(store, "bad", "[]", version="v2")
        registry.list()
        registry.list()
    warnings = [r.getMessage() for r in caplog.records if "bad" in r.getMessage()]
    assert len(warnings) == 2
    assert "holds a list" in warnings[1]


def test_metadata_of_a_newer_version_with_more_fields_is_still_read(
    registry: AdapterRegistry, store: SQLiteJobStore
) -> None:
    write_row(store, "newer", metadata_of("newer", quantization="int4"))
    assert registry.get("newer") == info("newer")
    assert [i.id for i in registry.list()] == ["newer"]


@pytest.mark.parametrize(
    "changes",
    [{"alpha": math.inf}, {"alpha": math.nan}, {"r": 0}, {"dropout": -0.5}, {"steps": 2**64}],
)
def test_register_never_writes_an_entry_it_could_not_read_back(
    registry: AdapterRegistry, artifacts: LocalArtifactStore, changes: dict[str, Any]
) -> None:
    staging = staged(registry)
    with pytest.raises(ValueError, match="cannot be registered"):
        registry.register(staging, dataclasses.replace(info("vader"), **changes))
    assert not registry.exists("vader")
    assert registry.list() == []
    assert versions(artifacts, "vader") == []


# --- adapters of the single-process releases


def legacy_entry(root: Path, name: str, metadata: str) -> Path:
    """One adapter as the single-process releases kept it: a directory of its files."""
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (directory / "adapter_config.json").write_bytes(CONFIG)
    (directory / METADATA_FILE).write_text(metadata)
    return directory


def test_import_legacy_adapters_moves_old_directories_into_the_registry(
    tmp_path: Path, registry: AdapterRegistry
) -> None:
    legacy = tmp_path / "adapters"
    old = dataclasses.replace(info("vader"), size_bytes=len(WEIGHTS) + len(CONFIG))
    vader = legacy_entry(legacy, "vader", json.dumps(dataclasses.asdict(old)))
    damaged = legacy_entry(legacy, "broken", "{not json")
    misnamed = legacy_entry(legacy, "yoda", metadata_of("luke"))
    half_written = legacy_entry(legacy, ".staging", metadata_of(".staging"))
    add(registry, "kept")
    already = legacy_entry(legacy, "kept", metadata_of("kept"))

    assert import_legacy_adapters(legacy, registry) == 1
    assert registry.get("vader") == old
    path = registry.path("vader")
    assert (path / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert (path / "adapter_config.json").read_bytes() == CONFIG
    assert not vader.exists()  # moved
    for left in (damaged, misnamed, half_written, already):  # left in place, not lost
        assert (left / METADATA_FILE).exists()
    assert sorted(i.id for i in registry.list()) == ["kept", "vader"]
    assert import_legacy_adapters(legacy, registry) == 0  # at the next start: nothing more
    assert import_legacy_adapters(tmp_path / "none", registry) == 0
