"""The RPC metrics interceptor: go-grpc-prometheus's series for every method, a stream timed
to its last message. Being the outermost interceptor, it also guards request parsing
(tuneserve.api.decoding): undecodable bytes end the call INVALID_ARGUMENT, counted as such,
instead of UNKNOWN with a traceback."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from tuneserve.api import decoding
from tuneserve.metrics import Metrics


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, *, max_request_bytes: Mapping[str, int] = {}) -> None:
        """`max_request_bytes`: by method path (/package.Service/Method), the largest
        request it takes; larger ones are refused unparsed (tuneserve.api.decoding)."""
        self._m = metrics
        self._max_bytes = dict(max_request_bytes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        # The guard sits inside the timing, so refused calls are counted, and after the
        # bearer-token check (inner to this interceptor), which leaves unauthenticated bytes
        # unparsed.
        handler = decoding.guard(
            await continuation(details),
            details.method,
            max_bytes=self._max_bytes.get(details.method),
        )
        if handler is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, ("unary", service, method)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, ("server_stream", service, method)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client and bidi streams: none in this service (reflection aside)

    def _unary(self, behavior: Any, labels: tuple[str, str, str]) -> Any:

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = self._start(labels)
            code = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except BaseException as e:
                code = _code(e, context)
                raise
            finally:
                self._end(labels, code, started)

        return wrapper

    def _stream(self, behavior: Any, labels: tuple[str, str, str]) -> Any:
        if not inspect.isasyncgenfunction(behavior):
            # A stream written with context.write (health Watch) is a coroutine: timed as one.
            return self._unary(behavior, labels)

        async def wrapper(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = self._start(labels)
            code = grpc.StatusCode.OK
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as e:
                code = _code(e, context)
                raise
            finally:
                self._end(labels, code, started)

        return wrapper

    def _start(self, labels: tuple[str, str, str]) -> float:
        self._m.rpc_started.labels(*labels).inc()
        return time.perf_counter()

    def _end(self, labels: tuple[str, str, str], code: grpc.StatusCode, started: float) -> None:
        self._m.rpc_handled.labels(*labels, code.name).inc()
        self._m.rpc_seconds.labels(*labels).observe(time.perf_counter() - started)


def _code(error: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN
