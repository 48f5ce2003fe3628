"""The inference worker: the engine (base model, adapters, continuous-batching decode loop)
in a process of its own, spawned by the server (inference/remote_engine.py).

Why a process: Python runs one thread at a time per process. In the server's process the
decode loop's Python (the model's forward is mostly Python on a small model, and all
launch overhead on a GPU) takes turns with the gRPC event loop's (a message per token per
stream), and every chunk handed to the event loop let it take the interpreter lock from the
decode thread. Measured on the benchmark's 16 streaming clients: the decode thread alone
generates ~1.6x what it did in the server's process. vLLM's engine core runs apart from its
API server for the same reason.

Protocol, over one duplex pipe (pickled tuples):
  server -> worker: ("generate", rid, GenerationRequest) | ("cancel", rid)
                    | ("call", cid, method, args, kwargs) | ("stop",)
  worker -> server: ("ready",) or ("failed", error) once, then
                    ("pass", [(rid, chunk or error)], [observer events], SchedulerStats)
                    after each pass of the decode loop that changed something,
                    ("memory", [(device, allocated, reserved)]) at most once a second on CUDA,
                    ("result", cid, value, error) for each call.
A request's last item is a chunk with a finish reason or an error. The worker ends when
told to stop or when the server's end of the pipe closes (the server died): it never
outlives the server. It ignores SIGINT and SIGTERM: the server drains, then stops it."""

from __future__ import annotations

import contextlib
import logging
import pickle
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tuneserve.config import ServerConfig
from tuneserve.errors import TuneserveError
from tuneserve.inference.engine import Engine
from tuneserve.inference.params import GenerationChunk, GenerationRequest
from tuneserve.inference.scheduler import Request, SchedulerStats
from tuneserve.inference.streams import Item
from tuneserve.registry import AdapterRegistry

log = logging.getLogger(__name__)

# What the server may call on the worker's engine (each returns picklable values).
CALLS = frozenset({"load_adapter", "unload_adapter", "check_fits", "drop_adapter", "adapter_state"})
MEMORY_EVERY_S = 1.0


def main(config: ServerConfig, adapters_dir: Path, conn: Connection) -> None:
    """The worker process's entry point (multiprocessing, spawn): serve the server's
    adapter registry at `adapters_dir`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from tuneserve.logs import setup_logging

    setup_logging(level=config.log_level, json_format=config.log_format == "json")
    Worker(config, adapters_dir, conn).run()


class _Recorder:
    """The scheduler's observer here: records each call, replayed on the server's metrics."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def first_token(self, seconds: float) -> None:
        self._outbox.event("first_token", seconds=seconds)

    def next_token(self, seconds: float) -> None:
        self._outbox.event("next_token", seconds=seconds)

    def generation_finished(self, **kwargs: Any) -> None:
        self._outbox.event("generation_finished", **kwargs)


class Outbox:
    """What the current pass produced, sent as one message. Thread-safe.

    It stays shut (dropping passes) until `open`: the warm-up generation while the model
    loads is nobody's request, and the server expects "ready" or "failed" first."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the buffers, and sends on the pipe
        self._open = False
        self._items: list[tuple[int, Item]] = []
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._stats: tuple[Any, ...] = ()

    def put(self, rid: int, item: Item) -> None:
        with self._lock:
            self._items.append((rid, _portable(item)))

    def event(self, name: str, **kwargs: Any) -> None:
        with self._lock:
            self._events.append((name, kwargs))

    def flush(self, stats: SchedulerStats) -> None:
        """Send the pass's items and events, or new stats, if there are any."""
        key = astuple(stats)
        with self._lock:
            if not self._open:
                self._items, self._events = [], []
                return
            if not self._items and not self._events and key == self._stats:
                return
            message = ("pass", self._items, self._events, stats)
            self._items, self._events, self._stats = [], [], key
            self._conn.send(message)

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.send(message)

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self, first: tuple[Any, ...]) -> None:
        """Send `first`, then every pass from now on."""
        with self._lock:
            self._items, self._events, self._open = [], [], True
            self._conn.send(first)


class _PipeSink:
    """A request's sink: its chunks go into the outbox under its id."""

    def __init__(self, rid: int, worker: Worker) -> None:
        self._rid, self._worker = rid, worker

    def put(self, item: Item) -> None:
        self._worker.outbox.put(self._rid, item)
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self._worker.ended(self._rid)


class Worker:
    def __init__(self, config: ServerConfig, adapters_dir: Path, conn: Connection) -> None:
        self._conn = conn
        self.outbox = Outbox(conn)
        # Running or waiting, by the server's id, for cancellation. A request can end on
        # the decode thread before the reader has recorded it: `_ended` remembers those.
        self._requests: dict[int, Request] = {}
        self._ended: set[int] = set()
        self._requests_lock = threading.Lock()
        self._memory_at = 0.0
        # The server's registry owns the directory (and clears its staging area on start).
        registry = AdapterRegistry(adapters_dir, clean=False)
        self.engine = Engine(
            config=config,
            registry=registry,
            observer=_Recorder(self.outbox),
            after_step=self._after_pass,
        )
        self._calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="worker-call")

    def run(self) -> None:
        try:
            self.engine.load()
        except BaseException as e:
            log.exception("the inference worker failed to load the model")
            self.outbox.send(("failed", _portable_error(e)))
            return
        self.outbox.open(("ready",))
        try:
            self._serve()
        finally:
            self.engine.stop()
            self._calls.shutdown(wait=False, cancel_futures=True)

    def _serve(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):  # the server is gone
                return
            kind = message[0]
            if kind == "generate":
                self._generate(message[1], message[2])
            elif kind == "cancel":
                with self._requests_lock:
                    request = self._requests.get(message[1])
                if request is not None:
                    request.cancel()
            elif kind == "call":
                self._calls.submit(self._call, *message[1:])
            elif kind == "stop":
                return

    def _generate(self, rid: int, request: GenerationRequest) -> None:
        try:
            pending = self.engine.submit(request, _PipeSink(rid, self))
        except BaseException as e:  # checked and refused before it queued
            self.outbox.put(rid, e)
            self.outbox.flush(self.engine.stats)
            return
        with self._requests_lock:
            if rid in self._ended:
                self._ended.discard(rid)
            else:
                self._requests[rid] = pending

    def ended(self, rid: int) -> None:
        """Request `rid` has had its last item (on the decode thread)."""
        with self._requests_lock:
            if self._requests.pop(rid, None) is None:
                self._ended.add(rid)

    def _call(self, cid: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            if method not in CALLS:
                raise TuneserveError(f"the inference worker has no call {method!r}")
            value = getattr(self.engine, method)(*args, **kwargs)
        except BaseException as e:
            error = _portable_error(e)
        with contextlib.suppress(OSError, ValueError):  # the server is gone
            self.outbox.send(("result", cid, value, error))

    def _after_pass(self) -> None:
        """On the decode thread, after each pass of its loop."""
        self.outbox.flush(self.engine.stats)
        now = time.monotonic()
        if (
            self.outbox.is_open
            and now - self._memory_at >= MEMORY_EVERY_S
            and self.engine.device.type == "cuda"
        ):
            self._memory_at = now
            self.outbox.send(("memory", cuda_memory()))


def cuda_memory() -> list[tuple[str, int, int]]:
    """(device, allocated bytes, reserved bytes) of this process, per CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        (f"cuda:{i}", torch.cuda.memory_allocated(i), torch.cuda.memory_reserved(i))
        for i in range(torch.cuda.device_count())
    ]


def _portable(item: Item) -> Item:
    return item if isinstance(item, GenerationChunk) else _portable_error(item)


def _portable_error(error: BaseException) -> BaseException:
    """`error`, or if it cannot cross the pipe, a plain one with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return TuneserveError(f"{type(error).__name__}: {error}")
