"""The RPC metrics interceptor: go-grpc-prometheus's series for every method, a stream timed
to its last message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from tuneserve.metrics import Metrics


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client and bidi streams: none in this service (reflection aside)

    def _unary(self, behavior: Any, service: str, method: str) -> Any:
        labels = ("unary", service, method)

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

    def _stream(self, behavior: Any, service: str, method: str) -> Any:
        labels = ("server_stream", service, method)

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
