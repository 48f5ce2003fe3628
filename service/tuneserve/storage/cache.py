"""A bounded local cache of immutable artifact keys: a serving replica pulls an adapter from
the artifact store the first time a request names it and keeps it on local disk while it is
used (as LoRAX and vLLM's LoRA resolvers do).

Keys never change (a retrain writes a new key), so a cached copy is never stale and needs no
invalidation; `forget` only frees the space sooner. Entries are directories under `root`
named by a hash of the key. A download goes into a temporary directory and is renamed into
place, so an entry is complete or absent; what a crash leaves in `root` besides entries is
removed when the next cache opens it, and the complete entries found are kept, the least
recently used first in line for eviction. One cache per root: two would remove each other's
downloads in progress.

When the store has local paths (a local or shared directory), `path` returns the store's own
directory: no copy, nothing counted in `bytes`.

Eviction runs after each download: least recently used entries go until the total is within
`max_bytes`, never the entry being returned, so one entry larger than the bound stays alone.
A removed entry's open files stay readable; a caller should read the path `path` returns
right away, not hold it for later."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from tuneserve.storage.artifacts import ArtifactStore, check_key, dir_bytes

log = logging.getLogger(__name__)

_ENTRY_RE = re.compile(r"^[0-9a-f]{64}$")


def _entry_name(key: str) -> str:
    return hashlib.sha256(check_key(key).encode()).hexdigest()


class _Download:
    """One key's download in progress; the callers that want the key meanwhile wait on it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class ArtifactCache:
    """Bounded local cache of immutable keys pulled from an ArtifactStore (replicas pull an
    adapter on first use). Every method is thread-safe."""

    def __init__(self, store: ArtifactStore, root: Path, *, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, not {max_bytes}")
        self.store = store
        self.root = root
        self.max_bytes = max_bytes
        self.hits = 0
        """Calls of `path` answered without waiting for a download (local paths included)."""
        self.misses = 0
        """Calls of `path` that downloaded, or waited for another caller's download."""
        self.bytes = 0
        """The size of the files of the entries held."""
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recent first
        self._downloads: dict[str, _Download] = {}
        root.mkdir(parents=True, exist_ok=True)
        adopted: list[tuple[float, str, int]] = []
        for child in root.iterdir():
            if _ENTRY_RE.match(child.name) and child.is_dir() and not child.is_symlink():
                adopted.append((child.stat().st_mtime, child.name, dir_bytes(child)))
            else:  # a download or a removal a crash interrupted
                _remove(child)
        for _, name, size in sorted(adopted):
            self._entries[name] = size
            self.bytes += size
        with self._lock:
            doomed = self._evict(keep="")
        for path in doomed:
            _remove(path)
        if adopted:
            log.info("artifact cache %s: kept %d entries, %d bytes", root, len(adopted), self.bytes)

    def path(self, key: str) -> Path:
        """The local directory holding the key's files: the store's own when it has one,
        else a cached copy, downloaded now if absent. Concurrent callers for one key share one
        download; if it fails, every one of them gets its error and nothing is kept.
        FileNotFoundError when the store does not have the key. Thread-safe."""
        local = self.store.local_path(key)
        if local is not None:
            with self._lock:
                self.hits += 1
            return local
        name = _entry_name(key)
        entry = self.root / name
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
                self.hits += 1
                download, leader = None, False
            else:
                self.misses += 1
                leader = name not in self._downloads
                download = self._downloads.setdefault(name, _Download())
        if download is None:
            with contextlib.suppress(OSError):  # the order of use survives a restart
                os.utime(entry)
            return entry
        if not leader:
            download.done.wait()
            if download.error is not None:
                raise download.error
            return entry
        try:
            size = self._download(key, entry)
        except BaseException as exc:
            with self._lock:
                del self._downloads[name]
            download.error = exc
            download.done.set()
            raise
        with self._lock:
            del self._downloads[name]
            self._entries[name] = size
            self.bytes += size
            doomed = self._evict(keep=name)
        download.done.set()
        for path in doomed:
            _remove(path)
        return entry

    def _download(self, key: str, entry: Path) -> int:
        tmp = self.root / f".download-{uuid.uuid4().hex}"
        try:
            self.store.get_dir(key, tmp)
            size = dir_bytes(tmp)
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("artifact cache: pulled %s from %s, %d bytes", key, self.store.url, size)
        return size

    def _evict(self, *, keep: str) -> list[Path]:
        """Take the least recently used entries but `keep` out of the cache until it is within
        bounds; the caller removes the returned directories outside the lock. Holds the lock."""
        doomed: list[Path] = []
        for name in list(self._entries):
            if self.bytes <= self.max_bytes:
                break
            if name != keep:
                doomed.append(self._take(name))
        return doomed

    def _take(self, name: str) -> Path:
        """Forget an entry and move its directory aside (one rename, quick enough to hold the
        lock for) so that a download of the same key can take its place. Holds the lock."""
        self.bytes -= self._entries.pop(name)
        aside = self.root / f".removed-{uuid.uuid4().hex}"
        os.rename(self.root / name, aside)
        return aside

    def forget(self, key: str) -> None:
        """Drop the cached copy of `key`, if any (after a delete or a retrain). A download of
        the key in progress is not stopped: it is cached when it ends. Thread-safe."""
        name = _entry_name(key)
        with self._lock:
            aside = self._take(name) if name in self._entries else None
        if aside is not None:
            _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
