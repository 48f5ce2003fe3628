"""The server's side of the inference worker (inference/worker.py): the engine's interface,
with the model, the adapters and the decode loop in a process of its own.

`load` spawns the worker and waits until it has loaded and warmed the model; requests,
cancellations and adapter commands go to it over a pipe; one reader thread hands each
pass's chunks to their callers (waking each event loop once per pass) and replays the
worker's timings on this process's metrics. If the worker dies, every request in flight
fails with UNAVAILABLE (retryable), the engine stops being ready and `on_lost` callbacks
run: the server shuts down and its supervisor (Kubernetes) starts a fresh one.

Classification stays in this process (inference/classifier.py, a model of its own)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from transformers import PreTrainedTokenizerBase as Tokenizer

from tuneserve.config import ServerConfig
from tuneserve.errors import Unavailable
from tuneserve.inference import worker
from tuneserve.inference.classifier import Classifier
from tuneserve.inference.engine import AdapterState
from tuneserve.inference.imports import import_adapter
from tuneserve.inference.params import GenerationRequest
from tuneserve.inference.scheduler import GenerationObserver, SchedulerStats
from tuneserve.inference.streams import ChunkStreams, Item, Sink
from tuneserve.models import load_tokenizer, resolve_device, resolve_dtype
from tuneserve.registry import AdapterInfo, AdapterRegistry

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 3600.0  # a large model from a slow disk; a dead worker is noticed at once
CALL_TIMEOUT_S = 330.0  # over the worker's own limit on a command (scheduler.call: 300 s)
STOP_TIMEOUT_S = 30.0


class WorkerLost(Unavailable):
    """The inference worker exited; requests in flight are lost, retrying them is safe."""


class RemoteEngine(ChunkStreams):
    """Thread-safe: every public method may be called from any thread."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        registry: AdapterRegistry,
        observer: GenerationObserver | None = None,
    ) -> None:
        super().__init__()
        self._config = config
        self._registry = registry
        self._observer = observer
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer: Tokenizer | None = None
        self._classifier = Classifier(
            base_model=config.base_model,
            registry=registry,
            device=self.device,
            dtype=self.dtype,
            max_tokens=config.max_prompt_tokens,
        )
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()  # the tables below, and sends on the pipe
        self._ids = itertools.count(1)
        self._requests: dict[int, Sink] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._stats = SchedulerStats()
        self._memory: list[tuple[str, int, int]] = []
        self._ready = False
        self._stopping = False
        self._on_lost: list[Callable[[], None]] = []

    # --- life cycle

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Run `callback` (on the reader thread) if the worker exits on its own."""
        self._on_lost.append(callback)

    def load(self) -> None:
        """Start the worker and wait until its model is loaded and warm."""
        self.tokenizer = load_tokenizer(self._config.base_model)
        context = multiprocessing.get_context("spawn")  # never fork a process using CUDA
        mine, theirs = context.Pipe()
        process = context.Process(
            target=worker.main,
            args=(self._config, self._registry.root, theirs),
            name="tuneserve-inference",
        )
        process.daemon = True  # multiprocessing ends it if this process exits first
        process.start()
        theirs.close()
        self._process, self._conn = process, mine
        message = self._first_message(mine, process)
        if message[0] == "failed":
            process.join(STOP_TIMEOUT_S)
            raise message[1]
        self._reader = threading.Thread(target=self._read, name="worker-reader", daemon=True)
        self._reader.start()
        self._ready = True
        log.info("inference worker ready (pid %s)", process.pid)

    def stop(self) -> None:
        """Stop the worker (after the server has drained its calls)."""
        self._stopping = True
        self._ready = False
        process, conn = self._process, self._conn
        if process is None or conn is None:
            return
        with contextlib.suppress(WorkerLost):
            self._send(("stop",))
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            log.warning("inference worker did not stop; killing it")
            process.kill()
            process.join(5)
        conn.close()
        if self._reader is not None:
            self._reader.join(5)

    # --- generation

    @property
    def stats(self) -> SchedulerStats:
        return self._stats

    @property
    def busy(self) -> bool:
        """Requests are running or waiting in the worker: the trainer yields the device."""
        return bool(self._requests)

    def submit(self, request: GenerationRequest, out: Sink) -> _Pending:
        rid = next(self._ids)
        if not self._ready:
            raise Unavailable("the model is still loading")
        with self._lock:
            self._requests[rid] = out
        try:
            self._send(("generate", rid, request))
        except BaseException:
            with self._lock:
                self._requests.pop(rid, None)
            raise
        return _Pending(self, rid)

    def _cancel(self, rid: int) -> None:
        with self._lock:
            running = rid in self._requests
        if running:
            with contextlib.suppress(WorkerLost):  # then its request has failed already
                self._send(("cancel", rid))

    # --- adapters

    def load_adapter(self, adapter_id: str, *, pin: bool) -> AdapterState:
        state: AdapterState = self._call("load_adapter", adapter_id, pin=pin)
        return state

    def unload_adapter(self, adapter_id: str) -> AdapterState:
        state: AdapterState = self._call("unload_adapter", adapter_id)
        return state

    def import_adapter(self, path: str, adapter_id: str) -> AdapterInfo:
        """Checked against the base model in the worker, registered from here."""
        return import_adapter(
            self._config,
            self._registry,
            path,
            adapter_id,
            check_fits=lambda i, source: self._call("check_fits", i, source),
        )

    def drop_adapter(self, adapter_id: str) -> None:
        self._classifier.drop(adapter_id)
        if self._ready:  # a worker started later reads the adapter as it is on disk then
            self._call("drop_adapter", adapter_id)

    def adapter_state(self) -> AdapterState:
        state: AdapterState = self._call("adapter_state")
        return state

    def classify(self, adapter_id: str, texts: list[str]) -> list[list[tuple[str, float]]]:
        """Label scores for each text with a classification adapter (in this process)."""
        if self.tokenizer is None:
            raise Unavailable("the model is still loading")
        return self._classifier.classify(adapter_id, texts, self.tokenizer)

    def cuda_memory(self) -> list[tuple[str, int, int]]:
        """The worker's CUDA memory (device, allocated, reserved), as it last reported."""
        return list(self._memory)

    # --- the pipe

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self._ready:
            raise Unavailable("the model is still loading")
        cid = next(self._ids)
        future: Future[Any] = Future()
        with self._lock:
            self._calls[cid] = future
        try:
            self._send(("call", cid, method, args, kwargs))
        except BaseException:
            with self._lock:
                self._calls.pop(cid, None)
            raise
        return future.result(timeout=CALL_TIMEOUT_S)

    def _send(self, message: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise Unavailable("the model is still loading")
        try:
            with self._lock:
                conn.send(message)
        except (OSError, ValueError):
            raise WorkerLost("the inference worker is gone; retry shortly") from None

    def _first_message(self, conn: Connection, process: BaseProcess) -> tuple[Any, ...]:
        waited = 0.0
        while not conn.poll(1.0):
            waited += 1.0
            if not process.is_alive():
                raise RuntimeError(
                    f"the inference worker exited with code {process.exitcode} while loading "
                    "the model (its log is above)"
                )
            if waited >= LOAD_TIMEOUT_S:
                process.kill()
                raise RuntimeError(f"the inference worker did not load in {LOAD_TIMEOUT_S:.0f}s")
        message: tuple[Any, ...] = conn.recv()
        return message

    def _read(self) -> None:
        assert self._conn is not None
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._dispatch(message)
            except Exception:  # a bad message must not stop every other stream
                log.exception("inference worker message %r failed", message[0])
        self._lost()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "pass":
            _, items, events, stats = message
            self._deliver(items)
            self._stats = stats
            if self._observer is not None:
                for name, kwargs in events:
                    getattr(self._observer, name)(**kwargs)
        elif kind == "result":
            _, cid, value, error = message
            with self._lock:
                future = self._calls.pop(cid, None)
            if future is not None:
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(value)
        elif kind == "memory":
            self._memory = message[1]

    def _deliver(self, items: list[tuple[int, Item]]) -> None:
        for rid, item in items:
            final = isinstance(item, BaseException) or item.finish_reason is not None
            with self._lock:
                out = self._requests.pop(rid, None) if final else self._requests.get(rid)
            if out is not None:
                out.put(item)
        self._wake_loops()

    def _lost(self) -> None:
        """The pipe closed: the worker exited (or this engine is stopping)."""
        self._ready = False
        with self._lock:
            requests, self._requests = self._requests, {}
            calls, self._calls = self._calls, {}
        if self._stopping and not requests and not calls:
            return
        process = self._process
        if process is not None:
            process.join(1)  # reap it, for its exit code
        code = process.exitcode if process is not None else None
        error = WorkerLost(f"the inference worker exited (code {code}); retry shortly")
        for out in requests.values():
            out.put(error)
        self._wake_loops()
        for future in calls.values():
            future.set_exception(error)
        if self._stopping:
            return
        log.error("the inference worker exited unexpectedly (code %s)", code)
        for callback in self._on_lost:
            callback()


class _Pending:
    """A request in the worker: `cancel` takes it out of the batch at the next step."""

    def __init__(self, engine: RemoteEngine, rid: int) -> None:
        self._engine, self._rid = engine, rid

    def cancel(self) -> None:
        self._engine._cancel(self._rid)
