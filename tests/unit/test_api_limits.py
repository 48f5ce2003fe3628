"""What the gRPC layer does with values that are too big or malformed before the core sees
them: statuses that always fit in a trailer, page tokens, caller fingerprints."""

from __future__ import annotations

import pytest
from google.rpc import error_details_pb2, status_pb2

from tuneserve import errors
from tuneserve.api.errors import MAX_MESSAGE_CHARS, to_status
from tuneserve.api.security import caller_of
from tuneserve.api.servicer import _page_offset


def _trailer_bytes(status: object) -> int:
    """Bytes on the wire: binary (-bin) values travel base64-encoded."""
    size = len(status.details)  # type: ignore[attr-defined]  # grpc-message
    for key, value in status.trailing_metadata:  # type: ignore[attr-defined]
        size += len(key) + (len(value) * 4 // 3 + 4 if key.endswith("-bin") else len(value))
    return size


def test_a_status_quoting_a_huge_value_still_fits_a_trailer() -> None:
    huge = "j" * 20_000
    status = to_status(errors.NotFound(f"job {huge} not found", field=huge))
    assert len(status.details) <= MAX_MESSAGE_CHARS
    assert _trailer_bytes(status) < 4096  # grpc clients accept 8 KiB of metadata by default


def test_many_field_violations_are_capped() -> None:
    problems = [errors.InvalidArgument("x" * 5000, field=f"f{i}" * 100) for i in range(500)]
    status = to_status(errors.InvalidArguments(problems))
    assert _trailer_bytes(status) < 6144  # under the 8 KiB clients accept, with room
    details = status_pb2.Status.FromString(
        dict(status.trailing_metadata)["grpc-status-details-bin"]
    )
    bad = error_details_pb2.BadRequest()
    assert details.details[1].Unpack(bad)
    assert 0 < len(bad.field_violations) <= 8


def test_errors_shown_cuts_long_values() -> None:
    assert errors.shown("abc") == "'abc'"
    cut = errors.shown("x" * 10_000)
    assert len(cut) < 120 and "10002 characters" in cut


@pytest.mark.parametrize("token", ["", "0", "50", "2147483648"])
def test_page_tokens_from_this_server(token: str) -> None:
    assert _page_offset(token) == int(token or 0)


@pytest.mark.parametrize("token", ["¹²³", "٣", "-1", "1e3", str(2**64), "9" * 40, " 1"])
def test_other_page_tokens_are_invalid_arguments(token: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        _page_offset(token)
    assert info.value.field == "page_token"


def test_callers_are_told_apart_by_a_fingerprint_of_their_token() -> None:
    alice = caller_of([("authorization", "Bearer alice-token")])
    assert alice == caller_of([("authorization", "bearer  alice-token ")])
    assert alice != caller_of([("authorization", "Bearer bob-token")])
    assert "alice" not in alice  # never the token itself: it is stored with the job
    assert caller_of([]) == caller_of([("authorization", "Bearer")]) == ""
