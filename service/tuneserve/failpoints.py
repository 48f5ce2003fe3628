"""Failpoints: named instants in a job's life where a test can make the process die as a
`kill -9` would (SIGKILL to itself: no handler, no flush, no cleanup), to show that a crash
at that instant loses nothing. They are armed only by the `failpoints` setting, which
operators leave empty; unarmed, `hit` is one truth test.

    tuneserve serve --failpoints job.step=3        # die at the third training step

Names, in the order a job meets them:
- `job.queued`: the job row is written, the caller not yet answered;
- `job.step`: a training step's loss point is written (mid-run);
- `checkpoint.write`: a checkpoint is fully written to its temporary directory, not yet
  renamed into place;
- `job.published`: the adapter is registered, the job not yet SUCCEEDED;
- `job.succeeded`: the job is SUCCEEDED, its after-success work not yet done."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

NAMES = ("job.queued", "job.step", "checkpoint.write", "job.published", "job.succeeded")

_lock = threading.Lock()
_armed: dict[str, int] = {}  # name -> hits left before the process dies


def parse(spec: str) -> dict[str, int]:
    """`name[=n],...`: die at the n-th hit of each name (default the first). ValueError
    names what is wrong."""
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition("=")
        if name not in NAMES:
            raise ValueError(f"{name!r} is not one of {', '.join(NAMES)}")
        if count and not (count.isascii() and count.isdigit() and int(count) >= 1):
            raise ValueError(f"{item!r}: the count must be a whole number of at least 1")
        armed[name] = int(count or 1)
    return armed


def arm(spec: str) -> None:
    """Arm the failpoints in `spec` (see `parse`); an empty spec disarms them all."""
    armed = parse(spec)
    with _lock:
        _armed.clear()
        _armed.update(armed)
    if armed:
        log.warning("failpoints armed (testing only): %s", spec)


def hit(name: str) -> None:
    """Die here if `name` is armed and this is the hit it waits for."""
    if not _armed:
        return
    with _lock:
        left = _armed.get(name)
        if left is None:
            return
        _armed[name] = left - 1
        if left > 1:
            return
    log.critical("failpoint %s: killing the process", name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
