"""Typed domain errors. The api layer maps each class to a gRPC status in one table
(tuneserve.api.errors); the core raises these and never chooses a status code itself."""

from __future__ import annotations


class TuneserveError(Exception):
    """Base of every error a caller may see. `reason` is a stable machine-readable code."""

    reason = "INTERNAL"

    def __init__(self, message: str, *, field: str = "", row: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.row = row


class InvalidArgument(TuneserveError):
    """The request is wrong; retrying it unchanged will fail again."""

    reason = "INVALID_ARGUMENT"


class InvalidArguments(InvalidArgument):
    """Several problems found at once; each is an InvalidArgument."""

    def __init__(self, problems: list[InvalidArgument]) -> None:
        first = problems[0]
        summary = "; ".join(p.message for p in problems)
        super().__init__(summary, field=first.field, row=first.row)
        self.problems = problems


class NotFound(TuneserveError):
    reason = "NOT_FOUND"


class AlreadyExists(TuneserveError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(TuneserveError):
    """The request is valid but the target is in the wrong state for it."""

    reason = "FAILED_PRECONDITION"


class ResourceExhausted(TuneserveError):
    """A bounded queue is full, or the server's disk; `retry_after_s` hints when to try
    again, `reason` says which (RESOURCE_EXHAUSTED, QUEUE_FULL, CALLER_QUEUE_FULL,
    DISK_FULL)."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float = 1.0,
        reason: str = "RESOURCE_EXHAUSTED",
        field: str = "",
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s
        self.reason = reason


class Unavailable(TuneserveError):
    """The server is not ready (model loading) or is shutting down; retry later."""

    reason = "UNAVAILABLE"


class Cancelled(TuneserveError):
    reason = "CANCELLED"


class Unauthenticated(TuneserveError):
    """The caller did not prove who it is: no credentials, or ones the server does not
    accept. `reason` says which (MISSING_TOKEN, INVALID_TOKEN)."""

    reason = "UNAUTHENTICATED"

    def __init__(self, message: str, *, reason: str = "UNAUTHENTICATED") -> None:
        super().__init__(message)
        self.reason = reason


def shown(value: object, limit: int = 64) -> str:
    """`value` as an error message quotes it (repr), cut to about `limit` characters: an
    error never echoes a whole field back (a 20 kB id would make a status trailer larger
    than clients accept)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def collect(problems: list[InvalidArgument]) -> None:
    """Raise every problem at once, or nothing if there are none."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InvalidArguments(problems)
