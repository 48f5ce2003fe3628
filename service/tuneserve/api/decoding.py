"""Requests whose bytes do not parse as the method's message: answered INVALID_ARGUMENT.

gRPC parses a request before any interceptor's behaviour runs, and a parse error raised
there ends the call UNKNOWN with a traceback logged at ERROR, once per call: anyone can
flood the log that way. `guard` wraps a method handler so that parsing cannot raise: a
failed parse yields an `Undecodable` marker in place of the message, and the wrapped
behaviour ends the call INVALID_ARGUMENT ("the request is not a valid <message>") with a
debug line, before the servicer sees it. Behaviours are grpc.aio's: coroutines, or async
generators for streamed responses; each wrapper keeps its behaviour's shape.

Parsing runs on the event loop, which also answers health checks: a method given a size
limit (`max_bytes`: Generate's prompt can only be so long) refuses a larger request from
its length alone, unparsed (a 9 MB prompt otherwise holds the loop for tens of ms per
call, first to parse, then to turn into a str)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tuneserve import errors
from tuneserve.api.errors import to_status

log = logging.getLogger(__name__)

Context = Any  # grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message that did not parse, or was not parsed because it
    is larger than its method takes (`error` says which)."""

    message_name: str
    error: str
    oversized: bool = False


def guard(
    handler: grpc.RpcMethodHandler | None, method: str, *, max_bytes: int | None = None
) -> grpc.RpcMethodHandler | None:
    """`handler` with a request parser that never raises and behaviour that answers an
    `Undecodable` request INVALID_ARGUMENT. A handler without a parser (raw bytes: the
    bearer-token refusal) is returned as it is. `max_bytes`: larger requests are refused
    unparsed."""
    if handler is None or handler.request_deserializer is None:
        return handler
    parse = _tolerant(handler.request_deserializer, max_bytes)
    kwargs = {"request_deserializer": parse, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, method), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _unary_stream(handler.unary_stream, method), **kwargs
        )
    if handler.stream_unary is not None:  # none in this server; reflection is stream-stream
        return grpc.stream_unary_rpc_method_handler(
            _stream_request(handler.stream_unary, method), **kwargs
        )
    return grpc.stream_stream_rpc_method_handler(
        _stream_request(handler.stream_stream, method), **kwargs
    )


def _tolerant(parse: Callable[[bytes], Any], max_bytes: int | None) -> Callable[[bytes], Any]:
    # A generated FromString is bound to its message class.
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "") or "request message"

    def tolerant(data: bytes) -> Any:
        if max_bytes is not None and len(data) > max_bytes:
            return Undecodable(
                name,
                f"the request is {len(data)} bytes, over the {max_bytes} this method takes "
                "(see the server's max_prompt_tokens)",
                oversized=True,
            )
        try:
            return parse(data)
        except (DecodeError, UnicodeDecodeError, RecursionError) as e:
            return Undecodable(name, str(e))

    return tolerant


async def _refuse(request: Undecodable, context: Context, method: str) -> None:
    log.debug("undecodable request to %s: %s", method, request.error)
    error = errors.InvalidArgument(
        request.error if request.oversized else f"the request is not a valid {request.message_name}"
    )
    await context.abort_with_status(to_status(error))


def _unary(behavior: Any, method: str) -> Any:
    async def unary(request: Any, context: Context) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context, method)
        return await behavior(request, context)

    return unary


def _unary_stream(behavior: Any, method: str) -> Any:
    if not inspect.isasyncgenfunction(behavior):  # writes with context.write (health Watch)
        return _unary(behavior, method)

    async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await _refuse(request, context, method)
        async for response in behavior(request, context):
            yield response

    return unary_stream


async def _checked(requests: AsyncIterator[Any], context: Context, method: str) -> Any:
    async for request in requests:
        if isinstance(request, Undecodable):
            await _refuse(request, context, method)
        yield request


def _stream_request(behavior: Any, method: str) -> Any:
    if inspect.isasyncgenfunction(behavior):

        async def streaming(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for response in behavior(_checked(requests, context, method), context):
                yield response

        return streaming

    async def single(requests: AsyncIterator[Any], context: Context) -> Any:
        return await behavior(_checked(requests, context, method), context)

    return single
