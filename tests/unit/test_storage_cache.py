"""tuneserve.storage.cache: replicas pull a key on first use, keep the recently used within a
byte bound, share one download between concurrent callers, keep nothing of a failed one,
and find their entries again after a restart."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.s3server import S3Endpoint, s3_endpoint  # noqa: F401
from tuneserve.errors import Unavailable
from tuneserve.storage.artifacts import LocalArtifactStore, S3ArtifactStore
from tuneserve.storage.cache import ArtifactCache


class RemoteStore:
    """A local store seen as a remote one (no local paths), counting and steering downloads."""

    def __init__(self, root: Path) -> None:
        self.inner = LocalArtifactStore(root)
        self.url = "remote://test"
        self.downloads: dict[str, int] = {}
        self.gate: threading.Event | None = None  # set: downloads wait for it
        self.started = threading.Event()
        self.fail = False  # downloads write half the files, then fail

    def put_dir(self, key: str, source: Path) -> int:
        return self.inner.put_dir(key, source)

    def get_dir(self, key: str, dest: Path) -> None:
        self.downloads[key] = self.downloads.get(key, 0) + 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail:  # a careless backend: leaves a partial `dest` behind
            dest.mkdir()
            (dest / "half").write_bytes(b"x")
            raise Unavailable("object storage remote://test: reading: connection reset")
        self.inner.get_dir(key, dest)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def local_path(self, key: str) -> Path | None:
        return None

    def check(self) -> None:
        self.inner.check()


@pytest.fixture
def remote(tmp_path: Path) -> RemoteStore:
    store = RemoteStore(tmp_path / "store")
    for name in "abcd":
        source = tmp_path / "sources" / name
        (source / "sub").mkdir(parents=True)
        (source / "adapter_model.safetensors").write_bytes(name.encode() * 900)
        (source / "sub" / "config.json").write_bytes(b"{}" * 50)  # 1000 bytes a key in all
        store.put_dir(f"adapters/{name}/1", source)
    return store


def test_first_use_downloads_then_hits(remote: RemoteStore, tmp_path: Path) -> None:
    cache = ArtifactCache(remote, tmp_path / "cache", max_bytes=10_000)
    first = cache.path("adapters/a/1")
    assert (first / "adapter_model.safetensors").read_bytes() == b"a" * 900
    assert (first / "sub" / "config.json").read_bytes() == b"{}" * 50
    assert first.parent == tmp_path / "cache"
    assert cache.path("adapters/a/1") == first
    assert (cache.hits, cache.misses, cache.bytes) == (1, 1, 1000)
    assert remote.downloads == {"adapters/a/1": 1}


def test_least_recently_used_go_first_beyond_the_bound(remote: RemoteStore, tmp_path: Path) -> None:
    cache = ArtifactCache(remote, tmp_path / "cache", max_bytes=2500)
    a = cache.path("adapters/a/1")
    b = cache.path("adapters/b/1")
    cache.path("adapters/a/1")  # a is now more recent than b
    c = cache.path("adapters/c/1")
    assert a.exists() and c.exists() and not b.exists()
    assert cache.bytes == 2000
    cache.path("adapters/b/1")  # back again: a download, and now a is the oldest
    assert not a.exists() and c.exists()
    assert remote.downloads["adapters/b/1"] == 2
    assert cache.bytes == 2000
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([b.name, c.name])


def test_an_entry_larger_than_the_bound_is_still_returned(
    remote: RemoteStore, tmp_path: Path
) -> None:
    cache = ArtifactCache(remote, tmp_path / "cache", max_bytes=10)
    a = cache.path("adapters/a/1")
    assert a.exists() and cache.bytes == 1000
    b = cache.path("adapters/b/1")
    assert b.exists() and not a.exists() and cache.bytes == 1000


def test_concurrent_callers_share_one_download(remote: RemoteStore, tmp_path: Path) -> None:
    cache = ArtifactCache(remote, tmp_path / "cache", max_bytes=10_000)
    remote.gate = threading.Event()
    results: list[Path] = []

    def use() -> None:
        results.append(cache.path("adapters/a/1"))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while cache.misses < 8 and time.monotonic() < deadline:  # all in, one downloading
        time.sleep(0.01)
    remote.gate.set()
    for t in threads:
        t.join(10)
    assert remote.downloads == {"adapters/a/1": 1}
    assert len(results) == 8 and len(set(results)) == 1
    assert (results[0] / "adapter_model.safetensors").read_bytes() == b"a" * 900


def test_a_failed_download_leaves_nothing_and_fails_every_waiter(
    remote: RemoteStore, tmp_path: Path
) -> None:
    cache = ArtifactCache(remote, tmp_path / "cache", max_bytes=10_000)
    remote.gate = threading.Event()
    remote.fail = True
    errors: list[BaseException] = []

    def use() -> None:
        try:
            cache.path("adapters/a/1")
        except Unavailable as exc:
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while cache.misses < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    remote.gate.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 4 and remote.downloads == {"adapters/a/1": 1}
    assert list((tmp_path / "cache").iterdir()) == []
    assert cache.bytes == 0
    remote.fail = False  # a failure is not remembered: the next caller tries again
    assert (cache.path("adapters/a/1") / "adapter_model.safetensors").exists()
    assert remote.downloads == {"adapters/a/1": 2}


def test_an_absent_key_is_not_found_and_leaves_nothing(remote: RemoteStore, tmp_path: Path) -> None:
    cache = ArtifactCache(remote, tmp_path / "cache", max_bytes=10_000)
    with pytest.raises(FileNotFoundError):
        cache.path("adapters/nobody/1")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_restart_keeps_complete_entries_and_removes_leftovers(
    remote: RemoteStore, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    first = ArtifactCache(remote, root, max_bytes=10_000)
    a = first.path("adapters/a/1")
    b = first.path("adapters/b/1")
    os.utime(a, (time.time() - 60, time.time() - 60))  # a was used longest ago
    (root / ".download-0123").mkdir()  # a download a crash interrupted
    (root / ".download-0123" / "half").write_bytes(b"x")
    (root / "stray-file").write_bytes(b"x")

    again = ArtifactCache(remote, root, max_bytes=10_000)
    assert again.bytes == 2000
    assert sorted(p.name for p in root.iterdir()) == sorted([a.name, b.name])
    assert again.path("adapters/a/1") == a and again.path("adapters/b/1") == b
    assert (again.hits, again.misses) == (2, 0)
    assert remote.downloads == {"adapters/a/1": 1, "adapters/b/1": 1}

    os.utime(a, (time.time() - 60, time.time() - 60))  # the hits touched both again
    smaller = ArtifactCache(remote, root, max_bytes=1500)  # a smaller bound: the oldest goes
    assert smaller.bytes == 1000 and b.exists() and not a.exists()


def test_forget_drops_the_copy(remote: RemoteStore, tmp_path: Path) -> None:
    cache = ArtifactCache(remote, tmp_path / "cache", max_bytes=10_000)
    a = cache.path("adapters/a/1")
    cache.forget("adapters/a/1")
    cache.forget("adapters/a/1")
    assert not a.exists() and cache.bytes == 0
    assert list((tmp_path / "cache").iterdir()) == []
    cache.path("adapters/a/1")
    assert remote.downloads == {"adapters/a/1": 2}


def test_a_local_store_is_read_in_place(remote: RemoteStore, tmp_path: Path) -> None:
    store = remote.inner
    cache = ArtifactCache(store, tmp_path / "cache", max_bytes=10)
    assert cache.path("adapters/a/1") == store.root / "adapters/a/1"
    assert list((tmp_path / "cache").iterdir()) == []
    assert cache.bytes == 0
    with pytest.raises(FileNotFoundError):
        cache.path("adapters/nobody/1")


def test_pulls_from_s3(s3_endpoint: S3Endpoint, tmp_path: Path) -> None:  # noqa: F811
    store = S3ArtifactStore(s3_endpoint.make_bucket(), "p", client=s3_endpoint.client())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    store.put_dir("adapters/a/1", tmp_path / "src")
    cache = ArtifactCache(store, tmp_path / "cache", max_bytes=1 << 20)
    path = cache.path("adapters/a/1")
    assert (path / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "src" / "adapter_model.safetensors"
    ).read_bytes()
    assert cache.path("adapters/a/1") == path
    assert (cache.hits, cache.misses, cache.bytes) == (1, 1, 4096)
