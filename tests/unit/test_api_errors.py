"""tuneserve.api.errors: the domain error -> gRPC status table and rich error details."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tuneserve import errors
from tuneserve.api.errors import DOMAIN, to_status

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
