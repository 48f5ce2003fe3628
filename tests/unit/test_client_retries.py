"""The Python client's retries and deadlines against a real gRPC server on port 0 whose fake
servicer fails on cue: what is retried, how long it waits, and what is never repeated."""

from __future__ import annotations

import io
import itertools
import random
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tuneserve_client import ClientError, RetryPolicy, TuneserveClient, progress_printer
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
FAST = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05, max_elapsed_s=5)


@dataclass
class Failure:
    code: grpc.StatusCode
    retry_after_s: float | None = None
    field: str = ""


@dataclass
class FakeServicer(pb_grpc.TuneserveServiceServicer):
    """Fails each call with the next scripted failure, then answers. Records every attempt."""

    failures: list[Failure] = field(default_factory=list)
    attempts: list[tuple[float, Any, dict[str, str]]] = field(default_factory=list)
    delay_s: float = 0.0
    stream_fail_after_first: Failure | None = None
    statuses: list[pb.Job] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _attempt(self, request: Any, context: grpc.ServicerContext, *, slow: bool = True) -> None:
        with self.lock:
            metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            self.attempts.append((time.monotonic(), request, metadata))
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            _abort(context, failure)
        if slow:
            time.sleep(self.delay_s)

    def TrainJob(self, request: Any, context: grpc.ServicerContext) -> pb.TrainJobResponse:
        self._attempt(request, context)
        return pb.TrainJobResponse(job=pb.Job(id="j1", request_id=request.request_id))

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> pb.GetStatusResponse:
        self._attempt(request, context)
        job = self.statuses.pop(0) if self.statuses else pb.Job(id=request.job_id)
        return pb.GetStatusResponse(job=job)

    def Generate(self, request: Any, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self._attempt(request, context)
        return pb.GenerateResponse(text="ok")

    def GenerateStream(
        self, request: Any, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        self._attempt(request, context, slow=False)  # the first message comes at once
        yield pb.GenerateStreamResponse(text="a", generated_tokens=1)
        if self.stream_fail_after_first is not None:
            _abort(context, self.stream_fail_after_first)
        time.sleep(self.delay_s)
        yield pb.GenerateStreamResponse(
            text="b", generated_tokens=2, finish_reason=pb.FINISH_REASON_LENGTH
        )


def _abort(context: grpc.ServicerContext, failure: Failure) -> None:
    details = []
    if failure.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(failure.retry_after_s * 1e9))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    if failure.field:
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.ErrorInfo(reason="BAD", metadata={"field": failure.field}))
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, failure.code.name), message="scripted", details=details
    )
    context.abort_with_status(rpc_status.to_status(status))


@pytest.fixture
def fake() -> Iterator[tuple[FakeServicer, str]]:
    servicer = FakeServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TuneserveServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def _gaps(servicer: FakeServicer) -> list[float]:
    times = [t for t, _, _ in servicer.attempts]
    return [b - a for a, b in itertools.pairwise(times)]


def test_backoff_is_full_jitter_under_an_exponential_bound() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=0.5)
    rng = random.Random(0)
    for retry, bound in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        waits = [policy.backoff_s(retry, rng=rng) for _ in range(500)]
        assert 0 <= min(waits) < 0.05 * bound and 0.95 * bound < max(waits) <= bound
    assert min(policy.backoff_s(1, hint_s=0.3, rng=rng) for _ in range(100)) == 0.3
    assert RetryPolicy.off().max_attempts == 1
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize("code", [UNAVAILABLE, EXHAUSTED])
def test_transient_failures_are_retried_until_the_call_succeeds(
    fake: tuple[FakeServicer, str], code: grpc.StatusCode
) -> None:
    servicer, target = fake
    servicer.failures = [Failure(code)] * 3
    with TuneserveClient(target, retry=FAST) as client:
        assert client.get_status("j").id == "j"
    assert len(servicer.attempts) == 4
    assert all(gap < 0.05 + 0.2 for gap in _gaps(servicer))  # bounded by max_backoff_s


def test_the_servers_retry_hint_is_the_shortest_wait(fake: tuple[FakeServicer, str]) -> None:
    servicer, target = fake
    servicer.failures = [Failure(EXHAUSTED, retry_after_s=0.15)] * 2
    with TuneserveClient(target, retry=FAST) as client:
        assert client.generate("hi").text == "ok"
    assert len(servicer.attempts) == 3
    assert all(gap >= 0.15 for gap in _gaps(servicer)), _gaps(servicer)


def test_attempts_are_bounded_and_the_last_error_is_raised(
    fake: tuple[FakeServicer, str],
) -> None:
    servicer, target = fake
    servicer.failures = [Failure(UNAVAILABLE)] * 10
    with (
        TuneserveClient(target, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as c,
        pytest.raises(ClientError) as e,
    ):
        c.get_status("j")
    assert e.value.code == UNAVAILABLE and len(servicer.attempts) == 3


def test_no_retry_when_the_hint_would_pass_the_time_bound(
    fake: tuple[FakeServicer, str],
) -> None:
    servicer, target = fake
    servicer.failures = [Failure(EXHAUSTED, retry_after_s=30.0)]
    started = time.monotonic()
    with TuneserveClient(target, retry=FAST) as client, pytest.raises(ClientError) as e:
        client.generate("hi")
    assert e.value.code == EXHAUSTED and e.value.retry_after_s == pytest.approx(30.0)
    assert len(servicer.attempts) == 1 and time.monotonic() - started < 2


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL]
)
def test_other_codes_are_never_retried(
    fake: tuple[FakeServicer, str], code: grpc.StatusCode
) -> None:
    servicer, target = fake
    servicer.failures = [Failure(code, field="dataset.rows[1].response")]
    with TuneserveClient(target, retry=FAST) as client, pytest.raises(ClientError) as e:
        client.train(rows=[{"text": "x"}])
    assert e.value.code == code and e.value.field == "dataset.rows[1].response"
    assert len(servicer.attempts) == 1


@pytest.mark.parametrize("retry", [None, RetryPolicy.off()])
def test_retries_switched_off(fake: tuple[FakeServicer, str], retry: RetryPolicy | None) -> None:
    servicer, target = fake
    servicer.failures = [Failure(UNAVAILABLE)]
    with TuneserveClient(target, retry=retry) as client, pytest.raises(ClientError):
        client.get_status("j")
    assert len(servicer.attempts) == 1


def test_a_retried_train_job_sends_the_same_request_id(fake: tuple[FakeServicer, str]) -> None:
    servicer, target = fake
    servicer.failures = [Failure(UNAVAILABLE), Failure(EXHAUSTED)]
    with TuneserveClient(target, retry=FAST) as client:
        job = client.train(rows=[{"text": "x"}], adapter_id="a")
        ids = {request.request_id for _, request, _ in servicer.attempts}
        assert len(servicer.attempts) == 3 and ids == {job.request_id} and job.request_id
        # The next submit is a new job: a new key. A caller's own key is kept.
        assert client.train(rows=[{"text": "x"}]).request_id not in ids
        assert client.train(rows=[{"text": "x"}], request_id="mine").request_id == "mine"


def test_a_stream_is_retried_while_nothing_has_arrived(fake: tuple[FakeServicer, str]) -> None:
    servicer, target = fake
    servicer.failures = [Failure(UNAVAILABLE), Failure(EXHAUSTED, retry_after_s=0.05)]
    with TuneserveClient(target, retry=FAST) as client:
        chunks = list(client.generate_stream("hi"))
    assert "".join(c.text for c in chunks) == "ab" and len(servicer.attempts) == 3


def test_a_stream_is_not_retried_after_its_first_message(
    fake: tuple[FakeServicer, str],
) -> None:
    servicer, target = fake
    servicer.stream_fail_after_first = Failure(UNAVAILABLE)
    received = []
    with TuneserveClient(target, retry=FAST) as client, pytest.raises(ClientError) as e:
        for chunk in client.generate_stream("hi"):
            received.append(chunk.text)
    assert e.value.code == UNAVAILABLE and received == ["a"]
    assert len(servicer.attempts) == 1


def test_deadlines_raise_deadline_exceeded_and_calls_can_override_them(
    fake: tuple[FakeServicer, str],
) -> None:
    servicer, target = fake
    servicer.delay_s = 0.5
    with TuneserveClient(target, timeout=0.1, generation_timeout=0.1, retry=FAST) as client:
        started = time.monotonic()
        with pytest.raises(ClientError) as e:
            client.get_status("j")
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 0.4 and len(servicer.attempts) == 1  # not retried
        assert client.get_status("j", timeout=5).id == "j"
        assert client.get_status("j", timeout=None).id == "j"
        with pytest.raises(ClientError) as e:
            client.generate("hi")
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # A stream's deadline bounds the whole stream, not just its first message.
        stream = client.generate_stream("hi", timeout=0.25)
        assert next(stream).text == "a"
        with pytest.raises(ClientError) as e:
            next(stream)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "".join(c.text for c in client.generate_stream("hi", timeout=5)) == "ab"


def test_the_deadline_bounds_the_retries_too(fake: tuple[FakeServicer, str]) -> None:
    servicer, target = fake
    servicer.failures = [Failure(UNAVAILABLE, retry_after_s=0.05)] * 100
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.01, max_elapsed_s=60)
    started = time.monotonic()
    with TuneserveClient(target, timeout=0.4, retry=policy) as c, pytest.raises(ClientError):
        c.get_status("j")
    assert time.monotonic() - started < 0.6 and 3 <= len(servicer.attempts) < 10


def test_a_token_is_sent_as_bearer_metadata_on_every_call(
    fake: tuple[FakeServicer, str],
) -> None:
    servicer, target = fake
    servicer.failures = [Failure(UNAVAILABLE)]
    with TuneserveClient(target, token="s3cret\n", retry=FAST) as client:
        client.get_status("j")
        list(client.generate_stream("hi"))
    assert [m.get("authorization") for _, _, m in servicer.attempts] == ["Bearer s3cret"] * 3
    with TuneserveClient(target) as client:
        client.get_status("j")
    assert "authorization" not in servicer.attempts[-1][2]


def test_wait_for_job_follows_the_job_and_prints_progress(
    fake: tuple[FakeServicer, str],
) -> None:
    servicer, target = fake
    progress = pb.JobProgress
    servicer.statuses = [
        pb.Job(id="j", state=pb.JOB_STATE_QUEUED, progress=progress(queue_position=1)),
        pb.Job(id="j", state=pb.JOB_STATE_RUNNING, progress=progress(step=0, total_steps=4)),
        pb.Job(id="j", state=pb.JOB_STATE_RUNNING, progress=progress(step=0, total_steps=4)),
        pb.Job(
            id="j",
            state=pb.JOB_STATE_RUNNING,
            progress=progress(step=2, total_steps=4, fraction_done=0.5, loss=1.5, epoch=1.0),
        ),
        pb.Job(
            id="j",
            state=pb.JOB_STATE_SUCCEEDED,
            progress=progress(step=4, total_steps=4, fraction_done=1.0, loss=0.5, epoch=2.0),
        ),
    ]
    out = io.StringIO()
    with TuneserveClient(target) as client:
        job = client.wait_for_job("j", on_progress=progress_printer(out), poll_s=0.001)
        assert job.state == pb.JOB_STATE_SUCCEEDED
        assert client.wait == client.wait_for_job  # the old name still works
        servicer.statuses = [pb.Job(id="j", state=pb.JOB_STATE_RUNNING)] * 1000
        with pytest.raises(TimeoutError):
            client.wait_for_job("j", poll_s=0.01, timeout=0.05)
    assert out.getvalue().splitlines() == [
        "job j QUEUED queue position 1",
        "job j RUNNING step 0/4 (0%)",  # printed once: the repeat did not move
        "job j RUNNING step 2/4 (50%) epoch 1.00 loss 1.5000",
        "job j SUCCEEDED step 4/4 (100%) epoch 2.00 loss 0.5000",
    ]
