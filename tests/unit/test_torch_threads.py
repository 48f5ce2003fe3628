"""tuneserve.torch_threads: work on a thread that ends with it, and what that buys: the
OpenMP team a thread starts for torch goes when the thread does."""

from __future__ import annotations

import contextvars
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from tuneserve.torch_threads import run_in_own_thread

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="")


def test_returns_the_result_from_another_thread_that_has_ended() -> None:
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert run_in_own_thread(work, name="worker") == 42
    (thread,) = seen
    assert thread is not threading.current_thread()
    assert thread.name == "worker"
    assert not thread.is_alive()


def test_raises_the_works_exception_here() -> None:
    def work() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run_in_own_thread(work, name="worker")


def test_the_callers_context_variables_go_with_the_work() -> None:
    token = VAR.set("job-7")
    try:
        assert run_in_own_thread(VAR.get, name="worker") == "job-7"
    finally:
        VAR.reset(token)


# In a fresh interpreter: the OS threads of the process after torch ran on the main thread,
# after the same work on a thread of its own, and while a long-lived thread that did it
# waits (the control: its OpenMP worker stays).
PROBE = textwrap.dedent(
    """
    import os, threading, time, torch
    from tuneserve.torch_threads import run_in_own_thread

    def tasks():
        return len(os.listdir("/proc/self/task"))

    def work():
        torch.ones(512, 512) @ torch.ones(512, 512)

    def settled(expected):
        deadline = time.monotonic() + 5
        while tasks() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return tasks()

    work()
    base = tasks()
    run_in_own_thread(work, name="own")
    own = settled(base)
    release = threading.Event()
    kept = threading.Thread(target=lambda: (work(), release.wait()))
    kept.start()
    time.sleep(0.5)
    long_lived = tasks() - 1  # less the thread itself
    release.set()
    kept.join()
    print(base, own, long_lived)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_a_thread_of_its_own_leaves_no_openmp_worker_behind() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},  # a team of 2, whatever the cores
    ).stdout.split()
    base, own, long_lived = map(int, out)
    assert own == base  # the team went with the thread
    assert long_lived > base  # the control: a thread that stays keeps its team
