"""tuneserve.registry: atomic adapter registration (idempotent for the job that owns the
adapter), lookup, listing and deletion, and entries damaged on disk that poison nothing."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from tuneserve.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tuneserve.registry import METADATA_FILE, AdapterInfo, AdapterRegistry

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


def add(registry: AdapterRegistry, adapter_id: str, created_at: float = 1000.0) -> AdapterInfo:
    staging = registry.staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (staging / "adapter_config.json").write_bytes(CONFIG)
    return registry.register(staging, info(adapter_id, created_at))


@pytest.fixture()
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters")


def test_register_moves_the_staging_directory_into_place(registry: AdapterRegistry) -> None:
    staging = registry.staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (staging / "nested").mkdir()
    (staging / "nested" / "adapter_config.json").write_bytes(CONFIG)
    out = registry.register(staging, info("vader"))

    assert not staging.exists()
    target = registry.root / "vader"
    assert (target / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert (target / "nested" / "adapter_config.json").read_bytes() == CONFIG
    assert out.size_bytes == len(WEIGHTS) + len(CONFIG)
    assert json.loads((target / METADATA_FILE).read_text())["size_bytes"] == out.size_bytes
    assert registry.get("vader") == out
    assert registry.exists("vader")
    assert registry.path("vader") == target


@pytest.mark.parametrize("job", ["job2", ""])
def test_duplicate_adapter_id_is_rejected_and_the_first_kept(
    registry: AdapterRegistry, job: str
) -> None:
    """Another job's adapter, or an import (no job), never replaces one already there."""
    first = add(registry, "vader")
    staging = registry.staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(b"other")
    with pytest.raises(AlreadyExists) as exc:
        registry.register(staging, info("vader", created_at=2000.0, job=job))
    assert exc.value.field == "adapter_id"
    assert registry.get("vader") == first
    assert (registry.root / "vader" / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_publishing_again_for_the_same_job_returns_the_adapter_already_there(
    registry: AdapterRegistry,
) -> None:
    """Issue 18 item 2: killed between publishing its adapter and being marked SUCCEEDED,
    a job runs again after the restart and publishes again; that must not fail it."""
    first = add(registry, "vader")
    staging = registry.staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(b"retrained")
    again = registry.register(staging, info("vader", created_at=2000.0, job="job1"))
    assert again == first
    assert not staging.exists()
    assert (registry.root / "vader" / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert [i.id for i in registry.list()] == ["vader"]


def test_unknown_adapter_is_not_found(registry: AdapterRegistry) -> None:
    with pytest.raises(NotFound) as exc:
        registry.get("nobody")
    assert exc.value.field == "adapter_id"
    with pytest.raises(NotFound):
        registry.path("nobody")
    with pytest.raises(NotFound):
        registry.delete("nobody")
    assert not registry.exists("nobody")


def test_delete_removes_the_adapter(registry: AdapterRegistry) -> None:
    add(registry, "vader")
    add(registry, "yoda")
    registry.delete("vader")
    assert not (registry.root / "vader").exists()
    assert not registry.exists("vader")
    with pytest.raises(NotFound):
        registry.get("vader")
    assert [i.id for i in registry.list()] == ["yoda"]
    assert list((registry.root / ".trash").iterdir()) == []
    add(registry, "vader")  # the id is free again
    assert registry.exists("vader")


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


def test_leftovers_of_a_crash_are_cleaned_at_construction(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    first = AdapterRegistry(root)
    add(first, "kept")
    crashed_write = first.staging_dir()
    (crashed_write / "adapter_model.safetensors").write_bytes(WEIGHTS)
    crashed_delete = root / ".trash" / "gone-123"
    crashed_delete.mkdir()
    (crashed_delete / METADATA_FILE).write_text(json.dumps({"id": "gone"}))

    second = AdapterRegistry(root)
    assert not crashed_write.exists()
    assert not crashed_delete.exists()
    assert list((root / ".staging").iterdir()) == []
    assert list((root / ".trash").iterdir()) == []
    assert [i.id for i in second.list()] == ["kept"]


@pytest.mark.parametrize("bad_id", ["../evil", "a/b", "..", ".staging", "Vader", "/etc"])
def test_path_like_ids_are_invalid_arguments(
    registry: AdapterRegistry, tmp_path: Path, bad_id: str
) -> None:
    with pytest.raises(InvalidArgument):
        registry.get(bad_id)
    with pytest.raises(InvalidArgument):
        registry.delete(bad_id)
    with pytest.raises(InvalidArgument):
        registry.exists(bad_id)
    staging = registry.staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(WEIGHTS)
    with pytest.raises(InvalidArgument):
        registry.register(staging, info(bad_id))
    assert staging.exists()  # nothing was moved anywhere
    assert not (tmp_path / "evil").exists()
    assert registry.list() == []


# --- damaged entries poison nothing


def write_entry(registry: AdapterRegistry, name: str, metadata: str | bytes) -> Path:
    """An entry as something other than `register` may have left it on disk."""
    directory = registry.root / name
    directory.mkdir()
    (directory / "adapter_model.safetensors").write_bytes(WEIGHTS)
    meta = directory / METADATA_FILE
    if isinstance(metadata, bytes):
        meta.write_bytes(metadata)
    else:
        meta.write_text(metadata)
    return meta


def metadata_of(adapter_id: str, **changes: Any) -> str:
    d = {**dataclasses.asdict(info(adapter_id)), **changes}
    return json.dumps({k: v for k, v in d.items() if v is not ...})


DAMAGE = {
    "not JSON": "{not json",
    "truncated": metadata_of("bad")[:50],
    "not UTF-8": b"\xff\xfe{",
    "a list": "[1, 2]",
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
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_entry_is_left_out_of_the_list_and_refused_by_get(
    registry: AdapterRegistry, damage: str
) -> None:
    """Issue 18 item 3: one such entry made every ListAdapters fail, across restarts."""
    add(registry, "good")
    write_entry(registry, "bad", DAMAGE[damage])
    assert [i.id for i in registry.list()] == ["good"]
    assert [i.id for i in AdapterRegistry(registry.root).list()] == ["good"]  # a restart
    with pytest.raises(FailedPrecondition) as exc:
        registry.get("bad")
    assert exc.value.field == "adapter_id"
    assert "'bad' is damaged" in exc.value.message
    with pytest.raises(FailedPrecondition):
        registry.path("bad")
    assert registry.exists("bad")  # the id is taken until it is deleted


def test_unreadable_metadata_is_damage_too(registry: AdapterRegistry) -> None:
    (registry.root / "bad" / METADATA_FILE).mkdir(parents=True)  # read() fails: a directory
    add(registry, "good")
    assert [i.id for i in registry.list()] == ["good"]
    with pytest.raises(FailedPrecondition, match="cannot be read"):
        registry.get("bad")


def test_a_damaged_entry_can_be_deleted(registry: AdapterRegistry) -> None:
    write_entry(registry, "bad", "{not json")
    registry.delete("bad")
    assert not (registry.root / "bad").exists()
    with pytest.raises(NotFound):
        registry.get("bad")
    add(registry, "bad")  # the id is free again
    assert registry.get("bad").id == "bad"


def test_a_damaged_entry_is_logged_once_until_it_changes(
    registry: AdapterRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    meta = write_entry(registry, "bad", "{not json")
    with caplog.at_level(logging.WARNING, logger="tuneserve.registry"):
        for _ in range(3):
            registry.list()
        assert len([r for r in caplog.records if "bad" in r.getMessage()]) == 1
        meta.write_text("[]")
        registry.list()
    warnings = [r.getMessage() for r in caplog.records if "bad" in r.getMessage()]
    assert len(warnings) == 2
    assert "holds a list" in warnings[1]


def test_metadata_of_a_newer_version_with_more_fields_is_still_read(
    registry: AdapterRegistry,
) -> None:
    write_entry(registry, "newer", metadata_of("newer", quantization="int4"))
    assert registry.get("newer") == info("newer")
    assert [i.id for i in registry.list()] == ["newer"]


@pytest.mark.parametrize(
    "changes",
    [{"alpha": math.inf}, {"alpha": math.nan}, {"r": 0}, {"dropout": -0.5}, {"steps": 2**64}],
)
def test_register_never_writes_an_entry_it_could_not_read_back(
    registry: AdapterRegistry, changes: dict[str, Any]
) -> None:
    staging = registry.staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(WEIGHTS)
    with pytest.raises(ValueError, match="cannot be registered"):
        registry.register(staging, dataclasses.replace(info("vader"), **changes))
    assert not registry.exists("vader")
    assert registry.list() == []
