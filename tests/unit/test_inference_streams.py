"""tuneserve.inference.streams: merging chunks a slow caller fell behind on, and the mailbox
that hands chunks from the decode thread to an event loop once per pass."""

from __future__ import annotations

import asyncio
import queue
import threading

from tuneserve.errors import Unavailable
from tuneserve.inference.params import FinishReason, GenerationChunk
from tuneserve.inference.streams import Item, Mailbox, coalesce


def chunk(text: str, n: int, reason: FinishReason | None = None) -> GenerationChunk:
    return GenerationChunk(
        text=text, generated_tokens=n, prompt_tokens=3, seed=7, finish_reason=reason
    )


def test_coalesce_merges_what_is_waiting_up_to_the_final_chunk() -> None:
    waiting: queue.SimpleQueue[Item] = queue.SimpleQueue()
    for item in (chunk(" b", 2), chunk(" c", 3, FinishReason.LENGTH), chunk("never", 4)):
        waiting.put(item)
    merged, error = coalesce(chunk("a", 1), waiting.get_nowait, queue.Empty)
    assert merged == chunk("a b c", 3, FinishReason.LENGTH)
    assert error is None
    assert waiting.get_nowait() == chunk("never", 4)  # nothing past the final chunk is taken


def test_coalesce_stops_when_nothing_is_waiting() -> None:
    waiting: queue.SimpleQueue[Item] = queue.SimpleQueue()
    merged, error = coalesce(chunk("a", 1), waiting.get_nowait, queue.Empty)
    assert (merged, error) == (chunk("a", 1), None)


def test_coalesce_returns_the_text_before_an_error_and_the_error() -> None:
    waiting: queue.SimpleQueue[Item] = queue.SimpleQueue()
    failure = Unavailable("the inference worker exited")
    waiting.put(chunk(" b", 2))
    waiting.put(failure)
    merged, error = coalesce(chunk("a", 1), waiting.get_nowait, queue.Empty)
    assert merged == chunk("a b", 2)
    assert error is failure


async def test_mailbox_delivers_on_wake_once_per_batch() -> None:
    mailbox = Mailbox(asyncio.get_running_loop())
    first: asyncio.Queue[int] = asyncio.Queue()
    second: asyncio.Queue[int] = asyncio.Queue()
    deliveries = 0
    deliver = mailbox._deliver

    def counted() -> None:
        nonlocal deliveries
        deliveries += 1
        deliver()

    mailbox._deliver = counted  # type: ignore[method-assign]

    def producer() -> None:  # a decoding pass: posts for two callers, then one wake
        mailbox.post(first, 1)
        mailbox.post(second, 2)
        mailbox.post(first, 3)
        mailbox.wake()
        mailbox.wake()  # a delivery is already on its way: no second one

    thread = threading.Thread(target=producer)
    thread.start()
    thread.join()
    await asyncio.wait_for(second.get(), timeout=5)
    assert [first.get_nowait(), first.get_nowait()] == [1, 3]
    assert deliveries == 1

    mailbox.post(first, 4)  # posted but not woken: not delivered
    await asyncio.sleep(0.01)
    assert first.empty()
    mailbox.wake()
    assert await asyncio.wait_for(first.get(), timeout=5) == 4
    assert deliveries == 2
    mailbox.wake()  # nothing posted: nothing scheduled
    await asyncio.sleep(0.01)
    assert deliveries == 2


def test_mailbox_of_a_closed_loop_drops_its_items() -> None:
    loop = asyncio.new_event_loop()
    mailbox = Mailbox(loop)
    out: asyncio.Queue[int] = asyncio.Queue()
    loop.close()
    mailbox.post(out, 1)
    mailbox.wake()  # no error: nobody is left to read them
    mailbox.post(out, 2)
    thread = threading.Thread(target=mailbox.wake)
    thread.start()
    thread.join()
    assert out.empty()
    assert not mailbox._items  # dropped, not kept for ever
