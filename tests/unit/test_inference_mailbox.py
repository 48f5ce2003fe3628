"""The mailbox between the decode thread and the event loop: everything arrives, in order;
deliveries are paced; first and last chunks and errors are never held back."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from tuneserve.inference.mailbox import LoopSink, Mailbox
from tuneserve.inference.params import FinishReason, GenerationChunk

INTERVAL_S = 0.3  # long against scheduling noise: a paced delivery is clearly later


def chunk(text: str, reason: FinishReason | None = None) -> GenerationChunk:
    return GenerationChunk(
        text=text, generated_tokens=1, prompt_tokens=1, seed=0, finish_reason=reason
    )


async def arrivals(out: asyncio.Queue[Any], n: int) -> list[tuple[Any, float]]:
    loop = asyncio.get_running_loop()
    got = []
    for _ in range(n):
        item = await asyncio.wait_for(out.get(), timeout=10)
        got.append((item, loop.time()))
    return got


def from_thread(fn: Any) -> None:
    """Call `fn` on another thread, as the decode thread posts."""
    t = threading.Thread(target=fn)
    t.start()
    t.join()


async def test_unpaced_delivers_everything_in_order() -> None:
    box = Mailbox(asyncio.get_running_loop(), interval_s=0.0)
    out: asyncio.Queue[Any] = asyncio.Queue()
    from_thread(lambda: [box.post(out, i) for i in range(50)])
    got = await arrivals(out, 50)
    assert [item for item, _ in got] == list(range(50))


async def started_stream() -> tuple[LoopSink, asyncio.Queue[Any], float]:
    """A paced stream whose first chunk ("a") was just delivered, and when it arrived."""
    out: asyncio.Queue[Any] = asyncio.Queue()
    sink = LoopSink(Mailbox(asyncio.get_running_loop(), interval_s=INTERVAL_S), out)
    from_thread(lambda: sink.put(chunk("a")))
    [(first, first_at)] = await arrivals(out, 1)
    assert first.text == "a"
    return sink, out, first_at


async def test_chunks_between_first_and_last_wait_for_the_interval() -> None:
    sink, out, first_at = await started_stream()
    from_thread(lambda: [sink.put(chunk(t)) for t in "bcd"])
    [(b, b_at)] = await arrivals(out, 1)
    # Held until the interval since the last delivery had passed, then given together.
    assert b.text == "b" and b_at >= first_at + INTERVAL_S * 0.9
    assert [out.get_nowait().text for _ in range(2)] == ["c", "d"]


async def test_the_first_chunk_and_the_last_go_at_once() -> None:
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[Any] = asyncio.Queue()
    box = Mailbox(loop, interval_s=INTERVAL_S)
    one, two = LoopSink(box, out), LoopSink(box, out)
    from_thread(lambda: one.put(chunk("a")))
    [(_, first_at)] = await arrivals(out, 1)
    # Within the interval: another request's first chunk, then this one's last.
    from_thread(lambda: two.put(chunk("x")))
    from_thread(lambda: one.put(chunk("z", FinishReason.LENGTH)))
    got = await arrivals(out, 2)
    assert [c.text for c, _ in got] == ["x", "z"]
    assert all(at < first_at + INTERVAL_S * 0.9 for _, at in got)


async def test_an_error_goes_at_once_with_what_came_before_it() -> None:
    sink, out, first_at = await started_stream()
    error = RuntimeError("step failed")
    from_thread(lambda: (sink.put(chunk("b")), sink.put(error)))
    got = await arrivals(out, 2)
    assert [item for item, _ in got][1] is error
    assert all(at < first_at + INTERVAL_S * 0.9 for _, at in got)


async def test_after_a_quiet_spell_a_chunk_goes_at_once() -> None:
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[Any] = asyncio.Queue()
    box = Mailbox(loop, interval_s=0.05)
    box.post(out, "first", now=True)
    await arrivals(out, 1)
    await asyncio.sleep(0.2)  # longer than the interval: nothing to pace against
    posted = loop.time()
    from_thread(lambda: box.post(out, "later"))
    [(item, at)] = await arrivals(out, 1)
    assert item == "later"
    assert at - posted < 0.04
