"""tuneserve.api.errors: the domain error -> gRPC status table and rich error details; and
requests whose bytes do not parse (tuneserve.api.decoding), answered INVALID_ARGUMENT."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tuneserve import errors
from tuneserve.api.errors import DOMAIN, to_status
from tuneserve.api.interceptors import MetricsInterceptor
from tuneserve.metrics import Metrics
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

DETAILS_KEY = "grpc-status-details-bin"


def unpack(status: grpc.Status) -> status_pb2.Status:
    [value] = [v for k, v in status.trailing_metadata if k == DETAILS_KEY]
    return status_pb2.Status.FromString(value)


def error_info(status: grpc.Status) -> error_details_pb2.ErrorInfo:
    infos = []
    for d in unpack(status).details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            infos.append(info)
    [info] = infos
    return info


def bad_request(status: grpc.Status) -> error_details_pb2.BadRequest | None:
    for d in unpack(status).details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            return br
    return None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            errors.InvalidArguments([errors.InvalidArgument("a"), errors.InvalidArgument("b")]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (errors.NotFound("gone"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("twice"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition("state"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("loading"), grpc.StatusCode.UNAVAILABLE),
        (errors.Cancelled("cancelled"), grpc.StatusCode.CANCELLED),
        (errors.TuneserveError("oops"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_class_maps_to_its_status_code(
    error: errors.TuneserveError, code: grpc.StatusCode
) -> None:
    status = to_status(error)
    assert status.code == code
    assert status.details == error.message
    packed = unpack(status)
    assert packed.code == getattr(code_pb2, code.name)
    assert packed.message == error.message
    info = error_info(status)
    assert info.reason == error.reason
    assert info.domain == DOMAIN == "tuneserve"


def test_error_info_names_field_and_row() -> None:
    error = errors.InvalidArgument(
        "dataset.inline.rows[2].response: is missing",
        field="dataset.inline.rows[2].response",
        row=2,
    )
    info = error_info(to_status(error))
    assert info.reason == "INVALID_ARGUMENT"
    assert dict(info.metadata) == {"field": "dataset.inline.rows[2].response", "row": "2"}


def test_row_zero_is_reported() -> None:
    info = error_info(to_status(errors.InvalidArgument("x", field="f", row=0)))
    assert info.metadata["row"] == "0"


def test_error_without_field_has_no_metadata_or_violations() -> None:
    status = to_status(errors.InvalidArgument("something is wrong"))
    assert dict(error_info(status).metadata) == {}
    assert bad_request(status) is None


def test_invalid_argument_carries_a_field_violation() -> None:
    status = to_status(errors.InvalidArgument("lora.r: 0 is too small", field="lora.r"))
    br = bad_request(status)
    assert br is not None
    assert [(v.field, v.description) for v in br.field_violations] == [
        ("lora.r", "lora.r: 0 is too small")
    ]


def test_several_problems_give_one_violation_each() -> None:
    problems = [
        errors.InvalidArgument("adapter_id: bad", field="adapter_id"),
        errors.InvalidArgument("lora.r: bad", field="lora.r"),
        errors.InvalidArgument("training.epochs: bad", field="training.epochs"),
    ]
    status = to_status(errors.InvalidArguments(problems))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    br = bad_request(status)
    assert br is not None
    assert [v.field for v in br.field_violations] == ["adapter_id", "lora.r", "training.epochs"]
    assert [v.description for v in br.field_violations] == [p.message for p in problems]
    assert error_info(status).metadata["field"] == "adapter_id"
    assert "lora.r: bad" in status.details


def test_other_errors_carry_no_bad_request() -> None:
    status = to_status(errors.NotFound("adapter 'x' not found", field="adapter_id"))
    assert bad_request(status) is None
    assert error_info(status).metadata["field"] == "adapter_id"


def retry_info(status: grpc.Status) -> error_details_pb2.RetryInfo | None:
    for d in unpack(status).details:
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            d.Unpack(info)
            return info
    return None


@pytest.mark.parametrize(
    ("retry_after_s", "seconds", "nanos"),
    [(1.0, 1, 0), (2.5, 2, 500_000_000), (0.25, 0, 250_000_000)],
)
def test_resource_exhausted_carries_the_retry_delay(
    retry_after_s: float, seconds: int, nanos: int
) -> None:
    status = to_status(errors.ResourceExhausted("queue full", retry_after_s=retry_after_s))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = retry_info(status)
    assert info is not None
    assert (info.retry_delay.seconds, info.retry_delay.nanos) == (seconds, nanos)
    assert info.retry_delay.ToTimedelta().total_seconds() == retry_after_s
    assert error_info(status).reason == "RESOURCE_EXHAUSTED"  # still there beside it
    assert bad_request(status) is None


def test_other_errors_carry_no_retry_info() -> None:
    for error in (errors.Unavailable("loading"), errors.InvalidArgument("x", field="f")):
        assert retry_info(to_status(error)) is None


# Undecodable requests (tuneserve.api.decoding, wired in by the metrics interceptor): a real
# grpc.aio server on port 0 with a stand-in servicer, called with raw bytes.

UNDECODABLE = b"\xff\xff\xff"  # field 0x1f..., wire type 7: corrupt for every message
SERVICE = pb.DESCRIPTOR.services_by_name["TuneserveService"]


class StandIn(pb_grpc.TuneserveServiceServicer):
    """Answers GetStatus and GenerateStream; records what reached it."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    async def GetStatus(self, request: pb.GetStatusRequest, context: object) -> object:
        self.seen.append(request)
        return pb.GetStatusResponse(job=pb.Job(id=request.job_id))

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: object
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        self.seen.append(request)
        for word in request.prompt.split():
            yield pb.GenerateStreamResponse(text=word)


@contextlib.asynccontextmanager
async def stand_in_server(
    *, tokens: Path | None = None
) -> AsyncIterator[tuple[grpc.aio.Channel, StandIn, Metrics]]:
    from tuneserve.api.security import BearerTokenInterceptor, TokenFile
    from tuneserve.api.server import create_server

    servicer, metrics = StandIn(), Metrics()
    server, port, health = await create_server(
        servicer,  # type: ignore[arg-type]
        address="127.0.0.1:0",
        max_message_bytes=1 << 20,
        interceptors=[MetricsInterceptor(metrics)],
        auth=BearerTokenInterceptor(TokenFile(tokens)) if tokens else None,
    )
    await server.start()
    await health.set(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, servicer, metrics
    finally:
        await channel.close()
        await server.stop(0)


async def call_raw(
    channel: grpc.aio.Channel, path: str, data: bytes, *, streaming: bool = False, **kwargs: Any
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if streaming:
            async for _ in channel.unary_stream(path)(data, timeout=10, **kwargs):
                pass
        else:
            await channel.unary_unary(path)(data, timeout=10, **kwargs)
    return caught.value


def handled(metrics: Metrics, method: str, code: str) -> float:
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "grpc_server_handled_total" and (
                s.labels["grpc_method"],
                s.labels["grpc_code"],
            ) == (method, code):
                return s.value
    return 0.0


async def test_undecodable_request_is_invalid_argument_without_a_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with stand_in_server() as (channel, servicer, metrics):
        with caplog.at_level(logging.DEBUG):
            for method in SERVICE.methods:
                error = await call_raw(
                    channel,
                    f"/{SERVICE.full_name}/{method.name}",
                    UNDECODABLE,
                    streaming=method.server_streaming,
                )
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, method.name
                name = method.input_type.full_name
                assert error.details() == f"the request is not a valid {name}"
                [value] = [v for k, v in error.trailing_metadata() if k == DETAILS_KEY]
                [detail] = status_pb2.Status.FromString(value).details
                info = error_details_pb2.ErrorInfo()
                assert detail.Unpack(info) and info.reason == "INVALID_ARGUMENT"
                assert handled(metrics, method.name, "INVALID_ARGUMENT") == 1
        assert servicer.seen == []
        # No traceback, no warning per call (other loggers' INFO lines, from whatever else
        # runs in the process, are not this test's business).
        noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
        assert not noisy, [r.getMessage() for r in noisy]


async def test_undecodable_health_and_reflection_requests_are_invalid_argument() -> None:
    async with stand_in_server() as (channel, _, metrics):
        error = await call_raw(channel, "/grpc.health.v1.Health/Check", UNDECODABLE)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert handled(metrics, "Check", "INVALID_ARGUMENT") == 1
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in reflect(iter([UNDECODABLE]), timeout=10):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_well_formed_requests_still_reach_the_servicer() -> None:
    async with stand_in_server() as (channel, servicer, metrics):
        stub = pb_grpc.TuneserveServiceStub(channel)
        reply = await stub.GetStatus(pb.GetStatusRequest(job_id="j1"), timeout=10)
        assert reply.job.id == "j1"
        chunks = [
            c.text
            async for c in stub.GenerateStream(pb.GenerateStreamRequest(prompt="a b"), timeout=10)
        ]
        assert chunks == ["a", "b"]
        assert [type(r) for r in servicer.seen] == [pb.GetStatusRequest, pb.GenerateStreamRequest]
        assert handled(metrics, "GenerateStream", "OK") == 1
        # A stream written with context.write (health Watch) passes the interceptor too.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


async def test_unauthenticated_bytes_are_refused_before_they_are_parsed(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t0ken\n")
    async with stand_in_server(tokens=tokens) as (channel, _, metrics):
        path = f"/{SERVICE.full_name}/GetStatus"
        error = await call_raw(channel, path, UNDECODABLE)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = await call_raw(
            channel, path, UNDECODABLE, metadata=(("authorization", "Bearer t0ken"),)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert handled(metrics, "GetStatus", "UNAUTHENTICATED") == 1
        assert handled(metrics, "GetStatus", "INVALID_ARGUMENT") == 1
