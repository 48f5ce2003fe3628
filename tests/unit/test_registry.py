"""tuneserve.registry: atomic adapter registration, lookup, listing and deletion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneserve.errors import AlreadyExists, InvalidArgument, NotFound
from tuneserve.registry import METADATA_FILE, AdapterInfo, AdapterRegistry

WEIGHTS = b"\x00" * 1000
CONFIG = b'{"r": 4}'


def info(adapter_id: str, created_at: float = 1000.0) -> AdapterInfo:
    return AdapterInfo(
        id=adapter_id,
        base_model="gpt2",
        r=4,
        alpha=8.0,
        dropout=0.05,
        target_modules=("c_attn", "c_proj"),
        source_job_id="job1",
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


def test_duplicate_adapter_id_is_rejected_and_the_first_kept(registry: AdapterRegistry) -> None:
    first = add(registry, "vader")
    staging = registry.staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(b"other")
    with pytest.raises(AlreadyExists) as exc:
        registry.register(staging, info("vader", created_at=2000.0))
    assert exc.value.field == "adapter_id"
    assert registry.get("vader") == first
    assert (registry.root / "vader" / "adapter_model.safetensors").read_bytes() == WEIGHTS


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
