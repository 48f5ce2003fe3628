"""tuneserve.coserving: training yields the device to generation, but only up to a bound."""

from __future__ import annotations

import threading
import time

import pytest

from tuneserve.coserving import DevicePolicy


class Busy:
    """generation_busy: busy until `until` (monotonic seconds); counts its calls."""

    def __init__(self, for_s: float) -> None:
        self.until = time.monotonic() + for_s
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return time.monotonic() < self.until


def timed(policy: DevicePolicy) -> float:
    started = time.monotonic()
    policy.before_training_step()
    return time.monotonic() - started


def test_an_idle_server_trains_without_waiting() -> None:
    busy = Busy(for_s=0.0)
    policy = DevicePolicy(generation_busy=busy, max_yield_s=10.0)
    assert timed(policy) < 0.05
    assert busy.calls == 1
    assert policy.yielded_s < 0.05


def test_the_decode_threads_are_released_before_a_step_only_while_nothing_is_generated() -> None:
    released: list[float] = []
    idle = DevicePolicy(
        generation_busy=Busy(for_s=0.0),
        max_yield_s=10.0,
        release_idle=lambda: released.append(time.monotonic()),
    )
    idle.before_training_step()
    assert len(released) == 1
    busy = DevicePolicy(
        generation_busy=Busy(for_s=60.0),
        max_yield_s=0.05,
        release_idle=lambda: released.append(time.monotonic()),
    )
    busy.before_training_step()  # generation running: its threads are in use
    assert len(released) == 1


def test_training_waits_while_generation_runs_and_goes_on_when_it_ends() -> None:
    policy = DevicePolicy(generation_busy=Busy(for_s=0.15), max_yield_s=10.0)
    waited = timed(policy)
    assert 0.14 <= waited < 2.0
    assert policy.yielded_s == pytest.approx(waited, abs=0.05)


def test_training_waits_no_longer_than_max_yield_s() -> None:
    policy = DevicePolicy(generation_busy=lambda: True, max_yield_s=0.1)
    waited = timed(policy)
    assert 0.1 <= waited < 1.0


def test_a_busy_flag_cleared_by_another_thread_ends_the_wait() -> None:
    generating = threading.Event()
    generating.set()
    policy = DevicePolicy(generation_busy=generating.is_set, max_yield_s=10.0)
    timer = threading.Timer(0.1, generating.clear)
    timer.start()
    try:
        assert 0.09 <= timed(policy) < 2.0
    finally:
        timer.cancel()


@pytest.mark.parametrize("max_yield_s", [0.0, -1.0])
def test_max_yield_s_zero_never_waits(max_yield_s: float) -> None:
    busy = Busy(for_s=60.0)
    policy = DevicePolicy(generation_busy=busy, max_yield_s=max_yield_s)
    assert timed(policy) < 0.05
    assert busy.calls <= 1  # one look: whether the decode thread's threads may go
    assert policy.yielded_s == 0.0


def test_yielded_time_accumulates_over_steps() -> None:
    policy = DevicePolicy(generation_busy=lambda: True, max_yield_s=0.05)
    waits = [timed(policy) for _ in range(3)]
    assert all(w >= 0.05 for w in waits)
    assert policy.yielded_s >= 0.15
    assert policy.yielded_s == pytest.approx(sum(waits), abs=0.05)
