"""tuneserve.inference.worker: what crosses the pipe between the server and its inference
worker. Errors keep their type and fields (the status a caller sees depends on them), one
that cannot be pickled still arrives with its message, and the outbox sends one message
per decoding pass, nothing before the worker is ready."""

from __future__ import annotations

import pickle
import threading
from multiprocessing import Pipe

import pytest

from tuneserve.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    InvalidArguments,
    NotFound,
    ResourceExhausted,
    TuneserveError,
    Unauthenticated,
    Unavailable,
)
from tuneserve.inference.params import FinishReason, GenerationChunk
from tuneserve.inference.remote_engine import WorkerLost
from tuneserve.inference.scheduler import SchedulerStats
from tuneserve.inference.worker import Outbox, _portable_error

ERRORS = [
    TuneserveError("boom", field="f", row=2),
    InvalidArgument("bad prompt", field="prompt"),
    InvalidArguments([InvalidArgument("a", field="x", row=1), InvalidArgument("b", field="y")]),
    NotFound("no adapter 'x'", field="adapter_id"),
    AlreadyExists("taken"),
    FailedPrecondition("a classifier", field="adapter_id"),
    ResourceExhausted("queue full", retry_after_s=2.5),
    Unavailable("loading"),
    Cancelled("gone"),
    Unauthenticated("no token", reason="MISSING_TOKEN"),
    WorkerLost("the worker exited"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_cross_the_pipe_whole(error: TuneserveError) -> None:
    assert _portable_error(error) is error
    copy = pickle.loads(pickle.dumps(error))
    assert state(copy) == state(error)
    assert str(copy) == str(error)


def state(error: BaseException) -> dict[str, object]:
    """An error's type and attributes, nested errors (InvalidArguments' problems) too."""
    fields = {k: [state(p) for p in v] if k == "problems" else v for k, v in vars(error).items()}
    return {"type": type(error), **fields}


def test_an_unpicklable_error_arrives_as_its_message() -> None:
    class Local(Exception):  # a class pickle cannot find by name
        pass

    error = _portable_error(Local("the tokenizer broke"))
    assert type(error) is TuneserveError
    assert str(error) == "Local: the tokenizer broke"
    pickle.dumps(error)


def chunk(n: int, reason: FinishReason | None = None) -> GenerationChunk:
    return GenerationChunk(
        text=f"t{n}", generated_tokens=n, prompt_tokens=2, seed=1, finish_reason=reason
    )


def test_outbox_is_shut_until_ready_then_sends_one_message_per_pass() -> None:
    mine, theirs = Pipe()
    outbox = Outbox(theirs)
    outbox.put(1, chunk(1))  # the warm-up, before "ready": nobody's request
    outbox.event("generation_finished", outcome="LENGTH")
    outbox.flush(SchedulerStats(steps=1))
    assert not mine.poll(0)

    outbox.open(("ready",))
    assert mine.recv() == ("ready",)
    assert not mine.poll(0)  # what the warm-up left was dropped

    outbox.put(7, chunk(1))
    outbox.put(8, chunk(1))
    outbox.put(7, chunk(2, FinishReason.LENGTH))
    outbox.event("first_token", seconds=0.5)
    stats = SchedulerStats(running=2, steps=3, tokens=4)
    outbox.flush(stats)
    message = mine.recv()
    assert message == (
        "pass",
        [(7, chunk(1)), (8, chunk(1)), (7, chunk(2, FinishReason.LENGTH))],
        [("first_token", {"seconds": 0.5})],
        stats,
    )
    outbox.flush(SchedulerStats(running=2, steps=3, tokens=4))  # nothing new: nothing sent
    assert not mine.poll(0)
    outbox.flush(SchedulerStats(running=0, steps=3, tokens=4))  # the stats alone changed
    assert mine.recv() == ("pass", [], [], SchedulerStats(running=0, steps=3, tokens=4))


def test_outbox_flush_is_safe_from_several_threads() -> None:
    mine, theirs = Pipe()
    outbox = Outbox(theirs)
    outbox.open(("ready",))
    mine.recv()

    def pass_(rid: int) -> None:
        for n in range(50):
            outbox.put(rid, chunk(n))
            outbox.flush(SchedulerStats(tokens=rid * 1000 + n))

    threads = [threading.Thread(target=pass_, args=(rid,)) for rid in range(4)]
    received: list[tuple[int, GenerationChunk]] = []
    reader = threading.Thread(
        target=lambda: [received.extend(mine.recv()[1]) for _ in iter(lambda: mine.poll(2), False)]
    )
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.join()
    for rid in range(4):  # every chunk arrived once, in order for its request
        assert [c.generated_tokens for r, c in received if r == rid] == list(range(50))
