"""The consumer side of a generation: how chunks produced on the decode thread (or read off
the inference worker's pipe) reach the caller, a thread or an event loop, and how a caller
that goes away takes its request out of the batch.

`ChunkStreams` gives an engine `generate` (for threads) and `generate_async` (for event
loops) on top of one method, `submit(request, out)`, which queues the request and returns
a handle whose `cancel()` takes it out of the batch at the next step."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from tuneserve.inference.params import GenerationChunk, GenerationRequest

CANCEL_POLL_S = 0.05

Item = GenerationChunk | BaseException


class Sink(Protocol):
    """Where a request's chunks go (a thread-safe put), ending with a final chunk or an error."""

    def put(self, item: Item) -> None: ...


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class ChunkStreams:
    """Thread-safe. Subclasses implement `submit`, and call `_wake_loops` once they have
    put a batch of chunks (after each pass of the decode loop)."""

    def __init__(self) -> None:
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
            weakref.WeakKeyDictionary()
        )
        self._mailboxes_lock = threading.Lock()

    def submit(self, request: GenerationRequest, out: Sink) -> Cancellable:
        raise NotImplementedError

    def generate(
        self, request: GenerationRequest, *, is_cancelled: Callable[[], bool]
    ) -> Iterator[GenerationChunk]:
        """Chunks of new text as they are produced; the last carries the finish reason."""
        out: queue.SimpleQueue[Item] = queue.SimpleQueue()
        pending = self.submit(request, out)
        try:
            while True:
                try:
                    item = out.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if is_cancelled():
                        pending.cancel()  # it leaves the batch at the next step
                    continue
                if isinstance(item, BaseException):
                    raise item
                chunk, error = coalesce(item, out.get_nowait, queue.Empty)
                yield chunk
                if error is not None:
                    raise error
                if chunk.finish_reason is not None:
                    return
        finally:
            pending.cancel()  # the consumer stopped early: free the slot

    async def generate_async(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """`generate` for an event loop: chunks are handed straight to the loop (no thread
        per request); cancelling the consumer frees the request's slot."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Item] = asyncio.Queue()
        with self._mailboxes_lock:
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                mailbox = self._mailboxes[loop] = Mailbox(loop)
        pending = self.submit(request, LoopSink(mailbox, out))
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                chunk, error = coalesce(item, out.get_nowait, asyncio.QueueEmpty)
                yield chunk
                if error is not None:
                    raise error
                if chunk.finish_reason is not None:
                    return
        finally:
            pending.cancel()

    def _wake_loops(self) -> None:
        """Wake every event loop that has chunks waiting, once for all of them."""
        with self._mailboxes_lock:
            mailboxes = list(self._mailboxes.values())
        for mailbox in mailboxes:
            mailbox.wake()


def coalesce(
    first: GenerationChunk,
    get_nowait: Callable[[], Item],
    empty: type[Exception],
) -> tuple[GenerationChunk, BaseException | None]:
    """Merge the chunks already waiting into one: a caller that fell behind gets one message
    per wake-up instead of one per token. Returns an error that came after them, if any."""
    texts, last = [first.text], first
    while last.finish_reason is None:
        try:
            item = get_nowait()
        except empty:
            break
        if isinstance(item, BaseException):
            return dataclasses.replace(last, text="".join(texts)), item
        texts.append(item.text)
        last = item
    return dataclasses.replace(last, text="".join(texts)), None


class LoopSink:
    """Puts onto an asyncio queue through the loop's mailbox, from any thread."""

    def __init__(self, mailbox: Mailbox, out: asyncio.Queue[Item]) -> None:
        self._mailbox, self._out = mailbox, out

    def put(self, item: Item) -> None:
        self._mailbox.post(self._out, item)


class Mailbox:
    """Hands items from another thread to one event loop's queues. Posting only appends;
    `wake` schedules one delivery for everything posted since the last. The producer wakes
    the loop once per batch of chunks (a decoding step's rows), after its own bookkeeping
    for them: a wake-up is a write to the loop's self-pipe, a system call that lets the
    event loop's thread take the interpreter lock from the producer until it has served
    the chunks.

    Thread-safe: `post` and `wake` from any thread; delivery runs on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._scheduled = False  # a delivery is on its way and will take new items too

    def post(self, out: asyncio.Queue[Any], item: Any) -> None:
        with self._lock:
            self._items.append((out, item))

    def wake(self) -> None:
        with self._lock:
            if not self._items or self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is left to read these
            with self._lock:
                self._items, self._scheduled = [], False

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for out, item in items:
            out.put_nowait(item)
