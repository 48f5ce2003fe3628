"""Torch work that must not leave a thread pool behind: run it on a thread that ends with it.

torch's CPU build runs its operators on OpenMP (GNU libgomp). libgomp gives every thread
that starts a parallel region a team of worker threads of its own, and keeps the team until
that thread exits. While libgomp manages more threads than there are cores, its idle
workers stop spin-waiting (100 spins instead of 300,000) and go to sleep at once, so every
parallel operator then pays to wake them. The decode loop runs thousands of small operators
a second: after one training job on the long-lived job-worker thread, decoding on a 2-core
machine ran about 30% slower for the rest of the process's life, and through a LoRA adapter
about half as fast (bench/generate, 16 clients).

So only the decode thread runs torch for as long as the process lives. Work of another
kind (a training job, loading a model, classifying) runs on a thread of its own that ends
when the work does, taking its team with it. What a thread pool thread (asyncio's, the
gRPC servicer's) may do is only wait for such a thread.

The same throttling slows a training job beside the idle decode thread's team: 10-20% on two
cores. So while nothing is generated, the decode loop moves to a fresh thread before a
training step (Scheduler.release_team) and the job's team is then the only one."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_own_thread(fn: Callable[[], T], *, name: str) -> T:
    """`fn()` on a new thread named `name`, which has ended by the time this returns; its
    result or its exception comes back here. The caller's context variables (a request or
    job id for the logs) go with it."""
    context = contextvars.copy_context()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(context.run(fn))
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
