"""The TuneserveService handlers: convert the request, call the core once, convert the
result. Errors are mapped by the decorators in tuneserve.api.errors."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeAlias

import grpc

from tuneserve.api import convert
from tuneserve.api.errors import streaming, unary
from tuneserve.api.security import caller_of
from tuneserve.errors import InvalidArgument, Unavailable
from tuneserve.inference.params import GenerationChunk, GenerationRequest
from tuneserve.jobs.manager import JobManager
from tuneserve.registry import AdapterInfo, AdapterRegistry
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
MAX_PAGE_SIZE = 1000
MAX_PAGE_OFFSET = 2**31  # far past any real store; keeps OFFSET in every backend's range
# Threads that drive generations; each waits its turn on the engine, off the event loop.
GENERATION_THREADS = 64
# Threads for work that may take long on large input (a dataset validated and written, an
# adapter checked): few, and apart from the rest, so a burst of it never keeps reads such
# as GetStatus waiting for a thread.
HEAVY_THREADS = 4


class Generator(Protocol):
    """What the servicer needs of the inference engine."""

    @property
    def ready(self) -> bool: ...

    def generate(
        self, request: GenerationRequest, *, is_cancelled: Callable[[], bool]
    ) -> Iterator[GenerationChunk]: ...

    def generate_async(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    def drop_adapter(self, adapter_id: str) -> None: ...

    def classify(self, adapter_id: str, texts: list[str]) -> list[list[tuple[str, float]]]: ...

    def load_adapter(self, adapter_id: str, *, pin: bool) -> Any: ...

    def unload_adapter(self, adapter_id: str) -> Any: ...

    def import_adapter(self, path: str, adapter_id: str) -> AdapterInfo: ...

    def adapter_state(self) -> Any:
        """Has `loaded` (ids) and `pinned` (ids)."""
        ...


class TuneserveServicer(pb_grpc.TuneserveServiceServicer):
    def __init__(self, *, jobs: JobManager, registry: AdapterRegistry, engine: Generator) -> None:
        self._jobs = jobs
        self._registry = registry
        self._engine = engine
        self._generation_pool = ThreadPoolExecutor(GENERATION_THREADS, "generate")
        self._heavy_pool = ThreadPoolExecutor(HEAVY_THREADS, "heavy")

    async def _heavy(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._heavy_pool, fn, *args)

    @unary
    async def TrainJob(self, request: pb.TrainJobRequest, context: Context) -> pb.TrainJobResponse:
        self._require_ready()
        caller = caller_of(context.invocation_metadata())

        def submit() -> Any:
            # Converting a large inline dataset is work too: off the event loop with it.
            return self._jobs.submit(convert.train_request(request, caller=caller))

        job = await self._heavy(submit)
        return pb.TrainJobResponse(job=convert.job(job))

    @unary
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: Context
    ) -> pb.GetStatusResponse:
        job = await asyncio.to_thread(self._jobs.get, request.job_id)
        return pb.GetStatusResponse(job=convert.job(job))

    @unary
    async def GetLossCurve(
        self, request: pb.GetLossCurveRequest, context: Context
    ) -> pb.GetLossCurveResponse:
        points = await asyncio.to_thread(self._jobs.loss_curve, request.job_id)
        return convert.loss_curve(points)

    @unary
    async def CancelJob(
        self, request: pb.CancelJobRequest, context: Context
    ) -> pb.CancelJobResponse:
        job = await asyncio.to_thread(self._jobs.cancel, request.job_id)
        return pb.CancelJobResponse(job=convert.job(job))

    @unary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        size = min(request.page_size or 50, MAX_PAGE_SIZE)
        offset = _page_offset(request.page_token)
        jobs = await asyncio.to_thread(
            self._jobs.list_jobs,
            state=convert.job_state(request.state),
            offset=offset,
            limit=size + 1,
        )
        more = len(jobs) > size
        return pb.ListJobsResponse(
            jobs=[convert.job(j) for j in jobs[:size]],
            next_page_token=str(offset + size) if more else "",
        )

    @unary
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: Context
    ) -> pb.ListAdaptersResponse:
        adapters = await asyncio.to_thread(self._registry.list)
        return pb.ListAdaptersResponse(adapters=[self._adapter(a) for a in adapters])

    @unary
    async def GetAdapter(
        self, request: pb.GetAdapterRequest, context: Context
    ) -> pb.GetAdapterResponse:
        info = await asyncio.to_thread(self._registry.get, request.adapter_id)
        return pb.GetAdapterResponse(adapter=self._adapter(info))

    @unary
    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: Context
    ) -> pb.LoadAdapterResponse:
        self._require_ready()
        await asyncio.to_thread(self._engine.load_adapter, request.adapter_id, pin=request.pin)
        info = await asyncio.to_thread(self._registry.get, request.adapter_id)
        return pb.LoadAdapterResponse(adapter=self._adapter(info))

    @unary
    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: Context
    ) -> pb.UnloadAdapterResponse:
        self._require_ready()
        info = await asyncio.to_thread(self._registry.get, request.adapter_id)
        await asyncio.to_thread(self._engine.unload_adapter, request.adapter_id)
        return pb.UnloadAdapterResponse(adapter=self._adapter(info))

    @unary
    async def ImportAdapter(
        self, request: pb.ImportAdapterRequest, context: Context
    ) -> pb.ImportAdapterResponse:
        self._require_ready()
        info = await self._heavy(self._engine.import_adapter, request.path, request.adapter_id)
        return pb.ImportAdapterResponse(adapter=self._adapter(info))

    @unary
    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: Context
    ) -> pb.DeleteAdapterResponse:
        await asyncio.to_thread(self._registry.delete, request.adapter_id)
        await asyncio.to_thread(self._engine.drop_adapter, request.adapter_id)
        return pb.DeleteAdapterResponse()

    @unary
    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        self._require_ready()
        domain = convert.generation_request(request)
        cancelled = threading.Event()

        def collect() -> tuple[str, GenerationChunk]:
            # The whole generation on one pool thread, one hop back: no per-token handoffs.
            chunks = list(self._engine.generate(domain, is_cancelled=cancelled.is_set))
            return "".join(c.text for c in chunks), chunks[-1]

        loop = asyncio.get_running_loop()
        try:
            text, last = await loop.run_in_executor(self._generation_pool, collect)
        finally:
            cancelled.set()  # the caller went away (or we are done): stop decoding for it
        return pb.GenerateResponse(
            text=text,
            finish_reason=convert.finish_reason(last.finish_reason),  # type: ignore[arg-type]
            prompt_tokens=last.prompt_tokens,
            generated_tokens=last.generated_tokens,
            seed=last.seed,
        )

    @unary
    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        self._require_ready()
        results = await self._heavy(self._engine.classify, request.adapter_id, list(request.texts))
        return convert.classifications(results)

    @streaming
    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        self._require_ready()
        # Chunks come straight from the decode thread to this coroutine (no thread of its
        # own); when the caller goes away, the request leaves the batch at the next step.
        async for chunk in self._engine.generate_async(convert.generation_request(request)):
            yield convert.stream_chunk(chunk)

    def _adapter(self, info: AdapterInfo) -> pb.Adapter:
        state = self._engine.adapter_state() if self._engine.ready else None
        return convert.adapter(
            info,
            loaded=state is not None and info.id in state.loaded,
            pinned=state is not None and info.id in state.pinned,
        )

    def _require_ready(self) -> None:
        if not self._engine.ready:
            raise Unavailable("the model is still loading; retry shortly")


_PAGE_TOKEN = re.compile(r"[0-9]{1,10}")


def _page_offset(token: str) -> int:
    if not token:
        return 0
    if not _PAGE_TOKEN.fullmatch(token) or int(token) > MAX_PAGE_OFFSET:
        raise InvalidArgument("page_token: not a token from this server", field="page_token")
    return int(token)
