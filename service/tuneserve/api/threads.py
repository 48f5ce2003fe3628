"""Running the core's blocking work off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(
    make: Callable[[Callable[[], bool]], Iterator[T]], *, executor: Executor
) -> AsyncIterator[T]:
    """Drive a blocking iterator on a worker thread and yield its items here.

    `make` receives an `is_cancelled` callable; when the consumer goes away (the client
    cancels, its deadline passes) it turns true and the producer stops at its next check.
    Long producers get their own `executor`, so that they cannot starve the default one that
    short calls (`asyncio.to_thread`) use."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    cancelled = threading.Event()

    def produce() -> None:
        try:
            for item in make(cancelled.is_set):
                loop.call_soon_threadsafe(queue.put_nowait, item)
                if cancelled.is_set():
                    break
        except BaseException as e:  # re-raised on the event loop side
            loop.call_soon_threadsafe(queue.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    worker = loop.run_in_executor(executor, produce)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        cancelled.set()
        await asyncio.shield(worker)
