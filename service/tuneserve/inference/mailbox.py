"""From the decode thread to the event loop: chunks of generated text handed to each
request's asyncio queue, with few wake-ups of the loop and few messages per stream."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from tuneserve.inference.params import GenerationChunk


class LoopSink:
    """Puts from the decode thread onto an asyncio queue, through the loop's mailbox. A
    request's first chunk and its last (or an error) go at once, the ones between at the
    mailbox's pace: time to first token and the end of a request are never held back."""

    def __init__(
        self, mailbox: Mailbox, out: asyncio.Queue[GenerationChunk | BaseException]
    ) -> None:
        self._mailbox, self._out = mailbox, out
        self._first = True

    def put(self, item: GenerationChunk | BaseException) -> None:
        now = self._first or isinstance(item, BaseException) or item.finish_reason is not None
        self._first = False
        self._mailbox.post(self._out, item, now=now)


class Mailbox:
    """Hands items from the decode thread to one event loop's queues, waking the loop once
    for everything posted before it gets round to them (one wake-up per decoding step for
    all the rows, not one per row: each wake-up is a write to the loop's self-pipe, and
    the decode thread spent several percent of its time in them).

    Deliveries are paced: at most one per `interval_s`, so that when steps are quick a
    stream gets one message for the tokens of several steps instead of one per token (each
    message costs the server and its client CPU time that the decoder would otherwise get:
    on a 2-core CPU, 20 ms pacing gave 16 clients 1.22-1.35x the tokens/s in
    bench/generate).
    A delivery due after a quiet spell goes at once, and so does one a sink asks for `now`.

    Thread-safe: `post` from any thread; delivery runs on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = 0.0) -> None:
        self._loop = loop
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._last = float("-inf")  # loop time of the last delivery
        self._rushed = False  # a delivery at once is on its way

    def post(self, out: asyncio.Queue[Any], item: Any, *, now: bool = False) -> None:
        """Queue `item` for `out`; `now`: deliver it (and everything before it) at once."""
        with self._lock:
            self._items.append((out, item))
            wake = len(self._items) == 1  # the first since the last delivery
            rush = now and not self._rushed
            self._rushed |= rush
        if rush:
            self._loop.call_soon_threadsafe(self._deliver)
        elif wake and not now:
            self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        delay = self._last + self._interval_s - self._loop.time()
        if delay > 0:
            self._loop.call_later(delay, self._deliver)
        else:
            self._deliver()

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._rushed = self._items, [], False
        if not items:  # an earlier delivery took them
            return
        self._last = self._loop.time()
        for out, item in items:
            out.put_nowait(item)
