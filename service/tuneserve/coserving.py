"""How a fine-tune and generation share one device.

Policy: generation first, training never starved. Before each optimizer step the trainer
asks `before_training_step`; while generation requests are running or waiting it waits,
but never longer than `max_yield_s` per step. So an idle server trains at full speed; under
steady generation load training slows to about one step per `max_yield_s` (plus the step),
and no generation request waits behind a training step for more than one step's time.

Memory: the trainer holds its own copy of the base model while a job runs (jobs/ and
training/runner.py); the decoder holds one copy shared by every adapter. Sharing the frozen
base weights between the two would halve that, at the price of a lock around every forward
pass; with the device time-sliced as above, that is the next step when memory is tight."""

from __future__ import annotations

import time
from collections.abc import Callable

POLL_S = 0.002


class DevicePolicy:
    """Thread-safe: it only reads `generation_busy`."""

    def __init__(
        self,
        *,
        generation_busy: Callable[[], bool],
        max_yield_s: float,
        release_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self._busy = generation_busy
        # Called before each step while nothing is generated: the decode thread lets go of
        # the threads it would compete with (Engine.release_idle_threads).
        self._release_idle = release_idle
        self._max_yield_s = max_yield_s
        self.yielded_s = 0.0  # total time training waited, for metrics and benchmarks

    def before_training_step(self) -> None:
        if not self._busy():
            self._release_idle()
            return
        if self._max_yield_s <= 0:
            return
        started = time.monotonic()
        deadline = started + self._max_yield_s
        while self._busy() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.yielded_s += time.monotonic() - started
