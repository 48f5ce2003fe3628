"""The one table from domain errors to gRPC status codes, and the rich error details
(AIP-193): every error carries a google.rpc.ErrorInfo, bad input a google.rpc.BadRequest
naming the field (and the dataset row in the ErrorInfo metadata)."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tuneserve import errors
from tuneserve.logs import request_id_var

log = logging.getLogger(__name__)

DOMAIN = "tuneserve"
# A status travels in trailers, which clients cap (grpc: 8 KiB by default): what a status
# says is cut to fit, whatever a message quoted.
MAX_MESSAGE_CHARS = 1024
MAX_DETAIL_CHARS = 160
MAX_VIOLATIONS = 8  # the first ones; the message still summarises them all (cut)

STATUS_CODES: dict[type[errors.TuneserveError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def status_code(error: errors.TuneserveError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 32]}... ({len(text)} characters)"


def to_status(error: errors.TuneserveError) -> grpc.Status:
    code = status_code(error)
    metadata = {"field": _cut(error.field, MAX_DETAIL_CHARS)} if error.field else {}
    if error.row is not None:
        metadata["row"] = str(error.row)
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    ]
    problems = getattr(error, "problems", [error])[:MAX_VIOLATIONS]
    violations = [
        error_details_pb2.BadRequest.FieldViolation(
            field=_cut(p.field, MAX_DETAIL_CHARS), description=_cut(p.message, MAX_DETAIL_CHARS)
        )
        for p in problems
        if p.field
    ]
    if isinstance(error, errors.InvalidArgument) and violations:
        details.append(error_details_pb2.BadRequest(field_violations=violations))
    if isinstance(error, errors.ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return rpc_status.to_status(
        status_pb2.Status(
            code=getattr(code_pb2, code.name),
            message=_cut(error.message, MAX_MESSAGE_CHARS),
            details=packed,
        )
    )


_R = TypeVar("_R")


def _bind_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Log lines of this call carry the caller's x-request-id, or one made up here."""
    given = dict(context.invocation_metadata() or ()).get("x-request-id", "")
    request_id_var.set(str(given)[:64] or uuid.uuid4().hex[:12])


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    if isinstance(error, errors.TuneserveError):
        await context.abort_with_status(to_status(error))
    log.exception("unexpected error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


def unary(
    handler: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[_R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[_R]]:
    """Map domain errors raised by a unary handler to their status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> _R:
        _bind_request_id(context)
        try:
            return await handler(self, request, context)
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            await _abort(context, e)
            raise AssertionError("unreachable") from e

    return wrapper


def streaming(
    handler: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_R]]:
    """Map domain errors raised by a server-streaming handler to their status."""

    @functools.wraps(handler)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_R]:
        _bind_request_id(context)
        try:
            async for item in handler(self, request, context):
                yield item
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            await _abort(context, e)

    return wrapper
