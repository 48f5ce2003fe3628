"""Generation throughput and latency: the service's continuous batching, over gRPC, against
the seed way and an ideal.

The service under test runs as it does in a deployment: `tuneserve serve` in a process of
its own (bound to a free port on loopback, ready when its health service says SERVING,
stopped with SIGTERM at the end), serving the same GPT-2-shaped model as bench/train, with
random weights, and given the same torch intra-op threads as the seed way and the ideal.
Its clients are the benchmark's process, as real clients are other processes: closed-loop
clients, each a thread with its own channel, stream greedy generations of
`max_new_tokens` from prompts of moderate, varied length, each client sending its next
request when the last one ends. (With the service in the benchmark's process, its decode
thread, event loop and gRPC would share one interpreter lock with up to 64 client threads:
that measures the benchmark's threads as much as the service.) Three contenders generate
from the very same prompts:

- service: 1, 4, 16 and 64 concurrent clients over gRPC (GenerateStream).
- seed: the seed way, one `model.generate` per request, in sequence, in-process, as the
  articles' notebooks generate.
- ideal: a bare batched decoding loop at the same batch size: the prompts left-padded and
  prefilled together, then one forward per step for the whole batch with the KV cache and
  an argmax, no server, no per-row work. What this device does with this model when nothing
  but the model runs; a reference, not a strict ceiling.

Throughput counts generated tokens (end-of-sequence excluded: a random model may stop
early, so real counts are used, never `max_new_tokens`) over wall time from the first
request sent to the last token received. The same run also measures:

- time to first token and inter-token latency, p50 and p99, at each concurrency;
- 16 clients each on a different LoRA adapter against all 16 on one adapter;
- one request over gRPC against the same generation through an engine built in the
  benchmark's process from the same configuration and model (the service's code path
  without gRPC);
- co-serving: p50 latency of generation while a training job runs against idle, and the
  job's training rate while generation runs against the job alone.

The machine may be shared, and load from other work drifts within minutes: the service and
the ideal run back to back at each concurrency, each ratio is taken within one repeat and
the median of those ratios reported, and every measurement records the cores that the
service's process, the benchmark's process (the clients, or the seed way's and the ideal's
own compute) and all other processes kept busy meanwhile. On a machine with few cores the
clients take CPU from the service as remote ones would not; the figures show how much.

Run `python -m bench.generate` from the repository root (`make bench`); the medians of
`--repeats` runs go to bench/results/generate.json and a table to stdout."""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import gc
import itertools
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

import tuneserve
from bench.common import (
    LengthMix,
    ModelShape,
    Row,
    build_model_dir,
    cpu_snapshot,
    environment,
    fmt,
    goal,
    make_rows,
    median,
    percentile,
    ratio,
    rotations,
    row_text,
    source_revision,
    synchronize,
    timed,
    write_json,
)
from tuneserve.config import ENV_PREFIX, ServerConfig
from tuneserve.inference.engine import Engine
from tuneserve.inference.kv_cache import growing_cache
from tuneserve.inference.params import GenerationRequest, SamplingParams
from tuneserve.logs import quiet_libraries
from tuneserve.models import load_model, resolve_device, resolve_dtype
from tuneserve.registry import local_registry
from tuneserve.torch_threads import run_in_own_thread
from tuneserve_client import FINAL_STATES, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb

RESULTS = Path(__file__).resolve().parent / "results"
BASE_CONTENDERS = ("service", "seed", "ideal")
POINT_CONTENDERS = ("service", "ideal")  # run back to back at each concurrency
# What a streaming user sees, compared between paced and per-token messages.
STREAM_FIELDS = (
    "ttft_p50_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "message_gap_p50_ms",
    "message_gap_p99_ms",
    "tokens_per_message",
)
# The issue's goals for generation.
GOAL_OVER_SEED = 5.0
GOAL_OVER_IDEAL = 0.7
GOAL_MIXED_OVER_SAME = 0.8
GOAL_GRPC_OVERHEAD = 0.10


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration. The defaults take a few minutes on a 2-core CPU."""

    shape: ModelShape = field(default_factory=ModelShape)
    # Prompt lengths in tokens. Moderate and without a long tail: the ideal pads a batch to
    # its longest prompt, so a tail would weaken the reference rather than test the server.
    prompt_mix: LengthMix = field(
        default_factory=lambda: LengthMix(short=(16, 48), long_fraction=0.0)
    )
    prompts: int = 64
    max_new_tokens: int = 32
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    # Requests per concurrency point: at least `min_requests`, and at least
    # `min_requests_per_client` per client so that clients rejoin a running batch.
    min_requests: int = 48
    min_requests_per_client: int = 2
    goal_concurrency: int = 16  # where the issue sets its goals
    adapters: int = 16  # the mixed-adapter point runs this many clients, one adapter each
    seed_requests: int = 32
    overhead_trials: int = 9
    # Co-serving: clients generating while a training job runs.
    coserve_clients: int = 4
    coserve_requests_per_client: int = 6
    coserve_alone_s: float = 4.0  # the training job's window without generation
    train_rows: int = 64
    train_tokens: tuple[int, int] = (56, 64)  # near-uniform rows: steps/s tracks tokens/s
    train_batch_size: int = 8
    poll_s: float = 0.05  # how often the job's step is read during co-serving
    seed: int = 0

    def requests_per_client(self, clients: int) -> int:
        return max(self.min_requests_per_client, math.ceil(self.min_requests / clients))

    @property
    def max_clients(self) -> int:
        return max(*self.concurrency, self.adapters, self.coserve_clients)


QUICK = Settings(
    shape=ModelShape(n_embd=64, n_layer=2, n_head=2, n_positions=256),
    prompt_mix=LengthMix(short=(8, 16), long_fraction=0.0),
    prompts=8,
    max_new_tokens=8,
    concurrency=(1, 4),
    min_requests=4,
    min_requests_per_client=1,
    goal_concurrency=4,
    adapters=4,
    seed_requests=4,
    overhead_trials=3,
    coserve_clients=2,
    coserve_requests_per_client=4,
    coserve_alone_s=1.0,
    train_rows=16,
    train_tokens=(16, 24),
    train_batch_size=4,
)


P = ParamSpec("P")
T = TypeVar("T")


def own_thread(fn: Callable[P, T]) -> Callable[P, T]:
    """`fn` on a thread of its own at every call, as the service runs its torch work beside
    the decode loop (tuneserve.torch_threads): this process's torch work then leaves no
    OpenMP team on a thread that lives on, and the in-process engine of `grpc_overhead`,
    whose decode thread holds one, runs as it would in the service rather than throttled."""

    @functools.wraps(fn)
    def on_own_thread(*args: P.args, **kwargs: P.kwargs) -> T:
        return run_in_own_thread(lambda: fn(*args, **kwargs), name=fn.__name__)

    return on_own_thread


# --- The server -----------------------------------------------------------------------------


class ServiceProcess:
    """The service under test: `tuneserve serve` in a process of its own, bound to a free
    port on loopback, as it runs in a deployment. Its port is read from its log, it is
    ready when its health service says SERVING, and `stop` ends it with SIGTERM (a kill if
    it does not go, or on any error while it starts): no process outlives the benchmark."""

    def __init__(self, config: ServerConfig, *, threads: int, timeout: float = 600) -> None:
        # The benchmark's settings, and only those: TUNESERVE_* variables of the calling
        # shell would otherwise fill in whatever the flags leave unset.
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        # torch takes its intra-op thread count from OMP_NUM_THREADS when it starts.
        env["OMP_NUM_THREADS"] = str(threads)
        self.command = [sys.executable, "-m", "tuneserve.cli", "serve", *serve_flags(config)]
        self.threads = threads
        self.grace_period_s = config.grace_period_s
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self._port: int | None = None
        self._port_seen = threading.Event()
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self._reader = threading.Thread(target=self._read, name="service-log", daemon=True)
        self._reader.start()
        try:
            self.target = f"127.0.0.1:{self._wait_port(timeout)}"
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        """Drain the log (a full pipe would block the service) and find the port in it."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self._port is None and (m := re.search(r"listening on port (\d+)", line)):
                self._port = int(m.group(1))
                self._port_seen.set()

    def _wait_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while not self._port_seen.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not report its port:\n{self.log_tail()}")
        assert self._port is not None
        return self._port

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with TuneserveClient(self.target) as client:
            while True:
                try:
                    client.wait_ready(timeout=1)
                    return
                except TimeoutError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"the service did not become ready:\n{self.log_tail()}"
                        ) from None

    def log_tail(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        """SIGTERM: the service drains for its grace period and exits; killed if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.grace_period_s + 60)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(10)
        if self.proc.returncode not in (0, -signal.SIGTERM):
            _log(f"the service exited with {self.proc.returncode}:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(10)


def serve_flags(config: ServerConfig) -> list[str]:
    """`tuneserve serve` flags for every setting of `config` that differs from the
    default, so that the process builds the very same configuration."""
    flags: list[str] = []
    for f in dataclasses.fields(ServerConfig):
        value = getattr(config, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("multiple"):
            flags += [x for item in value for x in (flag, str(item))]
        else:
            flags += [flag, str(value)]
    return flags


def server_config(s: Settings, args: argparse.Namespace, model_dir: Path, data: Path) -> Any:
    """Room for every client in one batch and every adapter loaded at once: the benchmark
    measures batching, not queueing behind a limit or adapter reloads."""
    return ServerConfig(
        base_model=str(model_dir),
        device=args.device,
        dtype=args.dtype,
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        data_dir=data,
        grace_period_s=1.0,
        max_batch_size=max(32, s.max_clients),
        max_queued_requests=max(256, 4 * s.max_clients),
        max_loaded_adapters=s.adapters + 1,
        # INFO: the port line the benchmark reads. The service logs at INFO only per job,
        # adapter load or lifecycle event, never per request or decoding step.
        log_level="INFO",
    ).validate()


# --- Workload -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What every contender gets: the same model files, prompts and settings."""

    settings: Settings
    service: ServiceProcess  # the service under test, in its own process
    # The same service streaming a message per token (stream_interval_ms 0), to show what
    # pacing the messages buys: measured at the goal concurrency only.
    per_token: ServiceProcess
    config: ServerConfig  # the service's configuration, for the in-process engine too
    local_adapters: Path  # the in-process engine's adapter directory (it serves none)
    tokenizer: Tokenizer
    reference: PreTrainedModel  # the seed way's and the ideal's copy of the base model
    device: torch.device
    prompts: list[str]
    train_rows: list[Row]  # the co-serving job's rows
    adapter_rows: list[Row]


def make_prompts(tokenizer: Tokenizer, s: Settings) -> list[str]:
    """Prompts of long-tailed length: a synthetic row's question and answer, as one text."""
    return [row_text(r) for r in make_rows(s.prompts, tokenizer, mix=s.prompt_mix, seed=s.seed)]


def plan(ctx: Context, clients: int, adapters: Sequence[str] = ("",)) -> list[list[Job]]:
    """Each client's requests, in order: prompts dealt out round the pool, so every
    concurrency point draws from the same prompts; client j uses adapters[j % len]."""
    per_client = ctx.settings.requests_per_client(clients)
    n = len(ctx.prompts)
    return [
        [
            Job(ctx.prompts[(j * per_client + k) % n], adapters[j % len(adapters)])
            for k in range(per_client)
        ]
        for j in range(clients)
    ]


@dataclass(frozen=True)
class Job:
    prompt: str
    adapter_id: str = ""


# --- Clients --------------------------------------------------------------------------------


@dataclass
class Timing:
    """One streamed request as its client saw it (perf_counter seconds)."""

    started: float
    first: float  # the first chunk with generated text: what a user sees first
    finished: float
    tokens: int
    gaps: list[float]  # one per token after the first chunk: chunk gap / tokens it holds
    messages: int  # chunks that brought tokens
    message_gaps: list[float]  # between those chunks: how often the user's text moves


def stream(client: TuneserveClient, job: Job, max_new_tokens: int) -> Timing:
    """One GenerateStream call, timed chunk by chunk. A chunk can hold more than one token
    (text is only released once it is final), so its gap is shared among its tokens."""
    started = time.perf_counter()
    first: float | None = None
    last_time, last_count, gaps, message_gaps, messages = started, 0, [], [], 0
    for chunk in client.generate_stream(
        job.prompt, adapter_id=job.adapter_id, greedy=True, max_new_tokens=max_new_tokens
    ):
        now = time.perf_counter()
        new = chunk.generated_tokens - last_count
        if new <= 0:  # the final chunk of a request that ended on end-of-sequence
            continue
        if first is None:
            first = now
        else:
            gaps += [(now - last_time) / new] * new
            message_gaps.append(now - last_time)
        last_time, last_count, messages = now, chunk.generated_tokens, messages + 1
    finished = time.perf_counter()
    first = first if first is not None else finished
    return Timing(started, first, finished, last_count, gaps, messages, message_gaps)


@dataclass
class Load:
    """Closed-loop clients' requests, the wall time from the first sent to the last
    received, and the CPU time the client threads themselves used (in the benchmark's
    process, beside the service's: on a small machine they share its cores)."""

    seconds: float
    timings: list[Timing]
    client_cpu_s: float

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.timings)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict[str, Any]:
        ttft = [t.first - t.started for t in self.timings]
        itl = [g for t in self.timings for g in t.gaps]
        e2e = [t.finished - t.started for t in self.timings]
        message_gaps = [g for t in self.timings for g in t.message_gaps]
        messages = sum(t.messages for t in self.timings)
        return {
            "requests": len(self.timings),
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "ttft_p50_ms": _ms(percentile(ttft, 50)),
            "ttft_p99_ms": _ms(percentile(ttft, 99)),
            "itl_p50_ms": _ms(percentile(itl, 50)),
            "itl_p99_ms": _ms(percentile(itl, 99)),
            "message_gap_p50_ms": _ms(percentile(message_gaps, 50)),
            "message_gap_p99_ms": _ms(percentile(message_gaps, 99)),
            "tokens_per_message": self.tokens / messages if messages else None,
            "latency_p50_ms": _ms(percentile(e2e, 50)),
            "latency_p99_ms": _ms(percentile(e2e, 99)),
            "client_cpu_cores": self.client_cpu_s / self.seconds,
        }


def run_clients(target: str, jobs: list[list[Job]], max_new_tokens: int) -> Load:
    """One thread and one channel per client. Every channel is connected (a health check)
    before a barrier releases them together, so connection set-up is in no timing."""
    barrier = threading.Barrier(len(jobs))
    results: list[list[Timing]] = [[] for _ in jobs]
    cpu = [0.0] * len(jobs)
    errors: list[BaseException] = []

    def client_thread(index: int) -> None:
        with TuneserveClient(target) as client:
            try:
                client.wait_ready(timeout=60)
                barrier.wait(timeout=120)
                started = time.thread_time()
                for job in jobs[index]:
                    results[index].append(stream(client, job, max_new_tokens))
                cpu[index] = time.thread_time() - started
            except BaseException as e:
                errors.append(e)
                barrier.abort()

    threads = [
        threading.Thread(target=client_thread, args=(i,), name=f"client-{i}")
        for i in range(len(jobs))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    timings = [t for mine in results for t in mine]
    seconds = max(t.finished for t in timings) - min(t.started for t in timings)
    return Load(seconds, timings, sum(cpu))


# --- Contenders -----------------------------------------------------------------------------


def run_service(
    ctx: Context, clients: int, service: ServiceProcess | None = None
) -> dict[str, Any]:
    """`clients` closed-loop clients over gRPC, base model, against `service` (the one
    under test unless given)."""
    target = (service or ctx.service).target
    return run_clients(target, plan(ctx, clients), ctx.settings.max_new_tokens).summary()


def run_per_token(ctx: Context, clients: int) -> dict[str, Any]:
    """`run_service` against the service that streams a message per token."""
    return run_service(ctx, clients, ctx.per_token)


def useful_tokens(generated: torch.Tensor, eos: int | None) -> int:
    """Tokens generated before the first end-of-sequence of each row (rows: dim 0)."""
    if eos is None:
        return generated.numel()
    ended = (generated == eos).int().cumsum(dim=-1) > 0
    return int((~ended).sum())


@own_thread
def run_seed(ctx: Context) -> dict[str, Any]:
    """The seed way: the prompts one after another, each tokenized and given to
    `model.generate` on its own, greedy."""
    s, tok, model = ctx.settings, ctx.tokenizer, ctx.reference
    prompts = [ctx.prompts[i % len(ctx.prompts)] for i in range(s.seed_requests)]

    @torch.inference_mode()
    def generate_all() -> int:
        tokens = 0
        for prompt in prompts:
            enc = tok(prompt, return_tensors="pt").to(ctx.device)
            out = model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=s.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            tokens += useful_tokens(out[0, enc["input_ids"].shape[1] :], tok.eos_token_id)
        return tokens

    tokens, seconds = timed(ctx.device, generate_all)
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


@torch.inference_mode()
def ideal_batch(ctx: Context, batch: list[list[int]]) -> int:
    """Prefill the left-padded batch in one forward, then one forward per step for every
    row with the KV cache (the one the service uses, written in place) and an argmax: the
    bare loop. Runs all `max_new_tokens` steps and
    counts the tokens before each row's end-of-sequence."""
    model, device, tok = ctx.reference, ctx.device, ctx.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        mask[i, width - len(ids) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=growing_cache(model.config),  # the service's cache, for a fair bar
        use_cache=True,
        logits_to_keep=1,
    )
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    generated, position, ones = [token], positions[:, -1:], mask.new_ones((len(batch), 1))
    for _ in range(ctx.settings.max_new_tokens - 1):
        mask, position = torch.cat([mask, ones], dim=1), position + 1
        out = model(
            input_ids=token,
            attention_mask=mask,
            position_ids=position,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(token)
    return useful_tokens(torch.cat(generated, dim=1), tok.eos_token_id)


@own_thread
def run_ideal(ctx: Context, batch_size: int) -> dict[str, Any]:
    """The same requests as the service's clients at this concurrency, in batches of that
    size; prompts are tokenized beforehand (the ideal has no request path)."""
    jobs = [job for client in plan(ctx, batch_size) for job in client]
    ids = [list(ctx.tokenizer(j.prompt)["input_ids"]) for j in jobs]
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    tokens, seconds = timed(ctx.device, lambda: sum(ideal_batch(ctx, b) for b in batches))
    return {
        "requests": len(ids),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


POINT_RUNNERS: dict[str, Callable[[Context, int], dict[str, Any]]] = {
    "service": run_service,
    "ideal": run_ideal,
}


# --- gRPC overhead --------------------------------------------------------------------------


def grpc_overhead(ctx: Context) -> dict[str, Any]:
    """One request at a time on an idle service: over gRPC (unary Generate, to the service's
    process) and through an engine built in this process from the same configuration and
    model files (the code path the service runs, minus gRPC), alternated, with the same
    prompt and parameters. The difference is the client, the channel across processes, the
    servicer and its thread hop. Each side is idle while the other is timed.

    The local engine lives only for this measurement, which runs after every run of the
    seed way and the ideal, which run in this process: the engine's decode thread holds an
    OpenMP team while it lives, and with a second team beside it libgomp stops spin-waiting
    (tuneserve.torch_threads; the seed way ran at ~0.6x with an engine loaded beside it)."""
    s = ctx.settings
    prompt = ctx.prompts[0]
    request = GenerationRequest(
        prompt=prompt, params=SamplingParams(max_new_tokens=s.max_new_tokens, greedy=True)
    )
    over_grpc: list[float] = []
    in_process: list[float] = []
    tokens: set[int] = set()
    with TuneserveClient(ctx.service.target) as client, local_engine(ctx) as engine:
        client.wait_ready()

        def remote() -> int:
            return client.generate(
                prompt, greedy=True, max_new_tokens=s.max_new_tokens
            ).generated_tokens

        def local() -> int:
            chunks = list(engine.generate(request, is_cancelled=lambda: False))
            return chunks[-1].generated_tokens

        remote(), local()  # untimed: the fresh engine's first request, the channel's
        for trial in range(s.overhead_trials):
            order = [(remote, over_grpc), (local, in_process)]
            for fn, into in order if trial % 2 == 0 else order[::-1]:
                n, seconds = timed(ctx.device, fn)
                into.append(seconds)
                tokens.add(n)
    grpc_s, local_s = median(over_grpc), median(in_process)
    assert grpc_s is not None and local_s is not None
    return {
        "trials": s.overhead_trials,
        "generated_tokens": sorted(tokens),
        "grpc_ms": grpc_s * 1000,
        "in_process_ms": local_s * 1000,
        "overhead": grpc_s / local_s - 1,
    }


@contextlib.contextmanager
def local_engine(ctx: Context) -> Iterator[Engine]:
    """An engine in this process, built from the service's configuration and model files
    (the same code path the service runs, minus gRPC), loaded and warmed, stopped after."""
    engine = Engine(config=ctx.config, registry=local_registry(ctx.local_adapters))
    engine.load()
    try:
        yield engine
    finally:
        engine.stop()


# --- Adapters -------------------------------------------------------------------------------


def train_adapters(ctx: Context) -> list[str]:
    """`adapters` LoRA adapters, each a one-step job through the service (different seeds,
    so different weights), then each loaded by one short request: the timed runs then
    measure mixed batches, not adapter loading."""
    s = ctx.settings
    ids = [f"bench-{i}" for i in range(s.adapters)]
    with TuneserveClient(ctx.service.target, timeout=120) as client:
        jobs = [
            client.train(
                rows=ctx.adapter_rows,
                adapter_id=adapter_id,
                training=pb.TrainingConfig(max_steps=1, batch_size=4, seed=s.seed + i),
            )
            for i, adapter_id in enumerate(ids)
        ]
        for job in jobs:
            done = client.wait(job.id, poll_s=0.1, timeout=900)
            if done.state != pb.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"adapter job {job.id} ended {done.state}: {done.error}")
        for adapter_id in ids:
            client.generate(ctx.prompts[0], adapter_id=adapter_id, greedy=True, max_new_tokens=1)
    return ids


def run_adapters(ctx: Context, adapters: list[str], kind: str) -> dict[str, Any]:
    """`adapters` clients, each on its own adapter ("mixed") or all on the first ("same")."""
    chosen = adapters if kind == "mixed" else adapters[:1]
    jobs = plan(ctx, len(adapters), chosen)
    return run_clients(ctx.service.target, jobs, ctx.settings.max_new_tokens).summary()


# --- Co-serving -----------------------------------------------------------------------------


class StepMonitor:
    """Reads a training job's step every `poll_s` from its own thread, so that a window's
    training rate is measured between step boundaries rather than in whole steps."""

    def __init__(self, target: str, job_id: str, poll_s: float) -> None:
        self._client = TuneserveClient(target)
        self._job_id, self._poll_s = job_id, poll_s
        self.samples: list[tuple[float, int]] = []
        self.state: int = pb.JOB_STATE_QUEUED
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._client.get_status(self._job_id)
            self.samples.append((time.perf_counter(), job.progress.step))
            self.state = job.state
            self._stop.wait(self._poll_s)

    def wait_step(self, step: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.samples or self.samples[-1][1] < step:
            if self.state in FINAL_STATES or time.monotonic() > deadline:
                raise RuntimeError(f"job {self._job_id} did not reach step {step}")
            time.sleep(self._poll_s)

    def steps_per_s(self, start: float, end: float) -> float | None:
        """Steps between the first and the last step change seen inside [start, end]."""
        inside = [(t, n) for t, n in self.samples if start <= t <= end]
        changes = [b for a, b in itertools.pairwise(inside) if b[1] != a[1]]
        if len(changes) < 2:
            return None
        (t0, n0), (t1, n1) = changes[0], changes[-1]
        return (n1 - n0) / (t1 - t0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._client.close()


def co_serving(ctx: Context, repeat: int, adapter_id: str) -> dict[str, Any]:
    """Generation latency idle, then a training job: its rate alone and while the same
    generation load runs (in alternating order across repeats), then it is cancelled. How
    the device is split is the service's co-serving policy (`training_yield_s`, recorded
    with the results); these figures show where it lands."""
    s, target = ctx.settings, ctx.service.target
    jobs = [
        [
            Job(ctx.prompts[(j * s.coserve_requests_per_client + k) % len(ctx.prompts)], adapter_id)
            for k in range(s.coserve_requests_per_client)
        ]
        for j in range(s.coserve_clients)
    ]
    idle = run_clients(target, jobs, s.max_new_tokens).summary()
    with TuneserveClient(target) as client:
        job = client.train(
            rows=ctx.train_rows,
            adapter_id=f"cotrain-{repeat}",
            training=pb.TrainingConfig(
                max_steps=10_000_000, batch_size=s.train_batch_size, seed=s.seed
            ),
        )
        monitor = StepMonitor(target, job.id, s.poll_s)
        try:
            monitor.wait_step(2)  # past loading the model and the first steps
            windows: dict[str, tuple[float, float]] = {}
            during: dict[str, Any] = {}
            for which in ("alone", "during") if repeat % 2 == 0 else ("during", "alone"):
                start = time.perf_counter()
                if which == "alone":
                    time.sleep(s.coserve_alone_s)
                else:
                    during = run_clients(target, jobs, s.max_new_tokens).summary()
                windows[which] = (start, time.perf_counter())
            alone_rate = monitor.steps_per_s(*windows["alone"])
            during_rate = monitor.steps_per_s(*windows["during"])
        finally:
            client.cancel(job.id)
            client.wait(job.id, poll_s=0.1, timeout=120)
            monitor.stop()
    tokens_per_step = s.train_batch_size * _mean_row_tokens(ctx)
    return {
        "idle": idle,
        "training": during,
        "latency_p50_ratio": ratio(during.get("latency_p50_ms"), idle["latency_p50_ms"]),
        "train_steps_per_s_alone": alone_rate,
        "train_steps_per_s_during": during_rate,
        "train_tokens_per_s_alone": _times(alone_rate, tokens_per_step),
        "train_tokens_per_s_during": _times(during_rate, tokens_per_step),
        "train_ratio": ratio(during_rate, alone_rate),
    }


def _mean_row_tokens(ctx: Context) -> float:
    """Tokens of a training row with its end-of-sequence token: the rows are near-uniform,
    so steps/s times batch size times this is the job's tokens/s."""
    lengths = [len(ctx.tokenizer(row_text(r))["input_ids"]) + 1 for r in ctx.train_rows]
    return sum(lengths) / len(lengths)


def _times(a: float | None, b: float) -> float | None:
    return None if a is None else a * b


# --- Warm-up --------------------------------------------------------------------------------


def warm_up(ctx: Context) -> None:
    """Untimed passes of every contender, so that one-off costs (lazy imports, allocator
    growth, kernel selection, the first connections) land on none of them."""
    s = ctx.settings
    clients = min(4, max(s.concurrency))
    for service in (ctx.service, ctx.per_token):
        run_clients(service.target, plan(ctx, clients), s.max_new_tokens)
    warm_reference(ctx, clients)


@own_thread
def warm_reference(ctx: Context, clients: int) -> None:
    """The seed way's and the ideal's untimed pass."""
    enc = ctx.tokenizer(ctx.prompts[0], return_tensors="pt").to(ctx.device)
    with torch.inference_mode():
        ctx.reference.generate(  # type: ignore[operator]
            **enc, max_new_tokens=4, do_sample=False, pad_token_id=ctx.tokenizer.pad_token_id
        )
    ids = [list(ctx.tokenizer(p)["input_ids"]) for p in ctx.prompts[:clients]]
    ideal_batch(ctx, ids)
    synchronize(ctx.device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- Report ---------------------------------------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _median_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    return median([r.get(key) for r in runs])


def _median_fields(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    return {k: _median_of(runs, k) for k in keys}


def _paired(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], key: str) -> float | None:
    """The median over repeats of a[r][key] / b[r][key]: each ratio compares two runs taken
    close together, so that load from other work, which drifts, cancels out of it."""
    return median([ratio(x.get(key), y.get(key)) for x, y in zip(a, b, strict=True)])


def summarise(
    s: Settings, runs: dict[str, list[Any]], *, stream_interval_ms: float | None = None
) -> dict[str, Any]:
    """Medians over repeats of every figure, medians of the per-repeat ratios, the goals.
    `stream_interval_ms`: the service's message pacing, recorded with the streaming figures."""
    levels = [str(c) for c in s.concurrency]
    service = {c: _median_fields([r[c] for r in runs["service"]]) for c in levels}
    ideal = {c: _median_fields([r[c] for r in runs["ideal"]]) for c in levels}
    seed_tps = _median_of(runs["seed"], "tokens_per_s")
    service_tps = {c: service[c]["tokens_per_s"] for c in levels}
    ideal_tps = {c: ideal[c]["tokens_per_s"] for c in levels}
    tps = {"service": service_tps, "ideal": ideal_tps, "seed": seed_tps}
    per_level = {c: [r[c] for r in runs["service"]] for c in levels}
    ratios = {
        "service_over_seed": {
            c: _paired(per_level[c], runs["seed"], "tokens_per_s") for c in levels
        },
        "service_over_ideal": {
            c: _paired(per_level[c], [r[c] for r in runs["ideal"]], "tokens_per_s") for c in levels
        },
        "ideal_over_seed": {
            c: _paired([r[c] for r in runs["ideal"]], runs["seed"], "tokens_per_s") for c in levels
        },
    }
    latency = {
        c: {k.removesuffix("_ms"): service[c][k] for k in service[c] if k.endswith("_ms")}
        for c in levels
    }
    mixed = _median_of(runs["mixed"], "tokens_per_s")
    same = _median_of(runs["same"], "tokens_per_s")
    at_adapters = str(s.adapters)
    mixed_over_same = _paired(runs["mixed"], runs["same"], "tokens_per_s")
    adapters = {
        "clients": s.adapters,
        "mixed_tokens_per_s": mixed,
        "same_tokens_per_s": same,
        "mixed_over_same": mixed_over_same,
        # What serving through a LoRA adapter costs against the bare base model.
        "same_over_base": ratio(same, service_tps.get(at_adapters)),
        "mixed_latency_ms": {
            k.removesuffix("_ms"): _median_of(runs["mixed"], k)
            for k in runs["mixed"][0]
            if k.endswith("_ms")
        },
        "same_latency_ms": {
            k.removesuffix("_ms"): _median_of(runs["same"], k)
            for k in runs["same"][0]
            if k.endswith("_ms")
        },
    }
    overhead = {
        k: _median_of(runs["grpc_overhead"], k) for k in ("grpc_ms", "in_process_ms", "overhead")
    }
    co = runs["co_serving"]
    co_serving = {
        "clients": s.coserve_clients,
        "latency_p50_idle_ms": median([r["idle"]["latency_p50_ms"] for r in co]),
        "latency_p50_training_ms": median([r["training"].get("latency_p50_ms") for r in co]),
        "latency_p50_ratio": _median_of(co, "latency_p50_ratio"),
        "generation_tokens_per_s_idle": median([r["idle"]["tokens_per_s"] for r in co]),
        "generation_tokens_per_s_training": median([r["training"].get("tokens_per_s") for r in co]),
        "train_steps_per_s_alone": _median_of(co, "train_steps_per_s_alone"),
        "train_steps_per_s_during": _median_of(co, "train_steps_per_s_during"),
        "train_tokens_per_s_alone": _median_of(co, "train_tokens_per_s_alone"),
        "train_tokens_per_s_during": _median_of(co, "train_tokens_per_s_during"),
        "train_ratio": _median_of(co, "train_ratio"),
    }
    g = str(s.goal_concurrency)
    streaming = {
        "clients": s.goal_concurrency,
        "stream_interval_ms": stream_interval_ms,
        "paced_tokens_per_s": service_tps.get(g),
        "per_token_tokens_per_s": _median_of(runs["per_token"], "tokens_per_s"),
        "paced_over_per_token": _paired(per_level[g], runs["per_token"], "tokens_per_s"),
        "paced": {k: service[g][k] for k in STREAM_FIELDS},
        "per_token": {k: _median_of(runs["per_token"], k) for k in STREAM_FIELDS},
    }
    goals = {
        f"service_over_seed_at_{g}": goal(ratios["service_over_seed"].get(g), GOAL_OVER_SEED, ">="),
        f"service_over_ideal_at_{g}": goal(
            ratios["service_over_ideal"].get(g), GOAL_OVER_IDEAL, ">="
        ),
        f"mixed_over_same_at_{s.adapters}": goal(mixed_over_same, GOAL_MIXED_OVER_SAME, ">="),
        "grpc_overhead": goal(overhead["overhead"], GOAL_GRPC_OVERHEAD, "<="),
    }
    other = [v for v in _values(runs, "other_cpu_cores") if v is not None]
    return {
        "goal_concurrency": s.goal_concurrency,
        "server_cpu_cores": {c: service[c].get("server_cpu_cores") for c in levels},
        "bench_cpu_cores": {c: service[c].get("bench_cpu_cores") for c in levels},
        "client_cpu_cores": {c: service[c].get("client_cpu_cores") for c in levels},
        "other_cpu_cores": {
            "median": median(other),
            "max": max(other, default=None),
            "note": "cores that processes other than the benchmark's and the service's kept "
            "busy during the measurements",
        },
        "throughput_tokens_per_s": tps,
        "ratios": ratios,
        "latency_ms": latency,
        "adapters": adapters,
        "grpc_overhead": overhead,
        "co_serving": co_serving,
        "streaming": streaming,
        "goals": goals,
        "all_goals_met": all(x["met"] for x in goals.values()),
    }


def table(report: dict[str, Any]) -> str:
    """The results as fixed-width text, for a terminal or a pull request."""
    tps, ratios, latency = report["throughput_tokens_per_s"], report["ratios"], report["latency_ms"]
    header = (
        f"{'clients':>7} {'tok/s':>8} {'x seed':>7} {'ideal':>8} {'x ideal':>8} "
        f"{'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} (ms) "
        f"{'server CPU':>10} {'clients':>7} {'bench':>5}"
    )
    lines = [header, "-" * len(header)]
    for c, rate in tps["service"].items():
        lat = latency[c]
        lines.append(
            f"{c:>7} {fmt(rate, '8.0f')} {fmt(ratios['service_over_seed'][c], '7.2f')} "
            f"{fmt(tps['ideal'][c], '8.0f')} {fmt(ratios['service_over_ideal'][c], '8.2f')} "
            f"{fmt(lat['ttft_p50'], '9.1f')} {fmt(lat['ttft_p99'], '7.1f')} "
            f"{fmt(lat['itl_p50'], '8.1f')} {fmt(lat['itl_p99'], '7.1f')}      "
            f"{fmt(report['server_cpu_cores'][c], '10.2f')} "
            f"{fmt(report['client_cpu_cores'][c], '7.2f')} "
            f"{fmt(report['bench_cpu_cores'][c], '5.2f')}"
        )
    a, o, co = report["adapters"], report["grpc_overhead"], report["co_serving"]
    st = report["streaming"]
    lines += [
        "",
        f"seed way (model.generate per request, in sequence): {fmt(tps['seed'], '.0f')} tok/s",
        f"{st['clients']} clients, messages paced every {fmt(st['stream_interval_ms'], 'g')} ms: "
        f"{fmt(st['paced_tokens_per_s'], '.0f')} tok/s, "
        f"{fmt(st['paced']['tokens_per_message'], '.1f')} tokens and "
        f"{fmt(st['paced']['message_gap_p50_ms'], '.1f')} ms apart per message (p50); "
        f"a message per token: {fmt(st['per_token_tokens_per_s'], '.0f')} tok/s, "
        f"{fmt(st['per_token']['message_gap_p50_ms'], '.1f')} ms apart; paced/per-token "
        f"{fmt(st['paced_over_per_token'], '.2f')}",
        f"{a['clients']} clients, one adapter each: {fmt(a['mixed_tokens_per_s'], '.0f')} tok/s; "
        f"all on one adapter: {fmt(a['same_tokens_per_s'], '.0f')} tok/s; "
        f"mixed/same {fmt(a['mixed_over_same'], '.2f')}; one adapter/base "
        f"{fmt(a['same_over_base'], '.2f')}",
        f"one request: {fmt(o['grpc_ms'], '.1f')} ms over gRPC, "
        f"{fmt(o['in_process_ms'], '.1f')} ms "
        f"in-process: overhead {fmt(_pct(o['overhead']), '+.1f')}%",
        f"co-serving ({co['clients']} clients): p50 latency "
        f"{fmt(co['latency_p50_idle_ms'], '.0f')} ms "
        f"idle, {fmt(co['latency_p50_training_ms'], '.0f')} ms while training "
        f"(x{fmt(co['latency_p50_ratio'], '.2f')}); training "
        f"{fmt(co['train_tokens_per_s_alone'], '.0f')} tok/s alone, "
        f"{fmt(co['train_tokens_per_s_during'], '.0f')} tok/s meanwhile "
        f"(x{fmt(co['train_ratio'], '.2f')})",
        "CPU in cores: server = the service's process; clients = the client threads; bench = "
        "the benchmark's whole process (clients, their channels)",
        f"other processes kept {fmt(report['other_cpu_cores']['median'], '.2f')} cores busy "
        f"(median; max {fmt(report['other_cpu_cores']['max'], '.2f')}) during the measurements",
        "",
    ]
    for name, g in report["goals"].items():
        mark = "met" if g["met"] else "NOT met"
        lines.append(f"goal {name}: {fmt(g['value'], '.3f')} {g['op']} {g['target']:.3f}: {mark}")
    return "\n".join(lines)


def _values(tree: Any, key: str) -> list[Any]:
    """Every value stored under `key` anywhere in nested dicts and lists."""
    if isinstance(tree, dict):
        found = [tree[key]] if key in tree else []
        return found + [v for x in tree.values() for v in _values(x, key)]
    if isinstance(tree, list):
        return [v for x in tree for v in _values(x, key)]
    return []


def _pct(value: float | None) -> float | None:
    return None if value is None else value * 100


# --- Main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.generate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender (median)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), float32, bfloat16")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/)")
    parser.add_argument(
        "--max-new-tokens", type=int, help=f"tokens per request (default {Settings.max_new_tokens})"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        help="client counts, comma-separated (default 1,4,16,64)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads, for this process (the seed way, the ideal, the "
        "in-process engine) and the service's alike (default: torch's, one per core). On a "
        "machine shared with other busy processes, 1 avoids threads waiting on a descheduled "
        "peer at every operation",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a goal is not met")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else Settings()
    if args.max_new_tokens:
        s = replace(s, max_new_tokens=args.max_new_tokens)
    if args.concurrency:
        s = replace(s, concurrency=args.concurrency)
    if str(s.goal_concurrency) not in {str(c) for c in s.concurrency}:
        s = replace(s, goal_concurrency=max(s.concurrency))
    return s


def measure(ctx: Context, repeats: int) -> dict[str, list[Any]]:
    """Every measurement, `repeats` times. The base model first (no adapter loaded yet, so
    the service serves the same bare model as the seed way and the ideal), then the gRPC
    overhead, then adapters, then co-serving. The service and the ideal run back to back
    at each concurrency, and the seed way first or last in turn, so that each ratio
    compares runs taken close together: on a shared machine the load of other work drifts
    within minutes."""
    s = ctx.settings
    runs: dict[str, list[Any]] = {name: [] for name in BASE_CONTENDERS}
    runs |= {"grpc_overhead": [], "mixed": [], "same": [], "co_serving": [], "per_token": []}
    warm_up(ctx)
    for repeat in range(repeats):
        tag = f"[{repeat + 1}/{repeats}]"
        seed_first = repeat % 2 == 0
        if seed_first:
            runs["seed"].append(with_contention(run_seed, ctx))
        points: dict[str, dict[str, Any]] = {name: {} for name in POINT_CONTENDERS}
        for c in s.concurrency:
            for name in _order(POINT_CONTENDERS, repeat):
                points[name][str(c)] = with_contention(POINT_RUNNERS[name], ctx, c)
                _release(ctx.device)
            service, ideal = points["service"][str(c)], points["ideal"][str(c)]
            _log(
                f"{tag} {c:>3} clients: service {service['tokens_per_s']:6.0f} tok/s, ideal "
                f"{ideal['tokens_per_s']:6.0f} tok/s; server CPU "
                f"{fmt(service['server_cpu_cores'], '.2f')}, bench "
                f"{fmt(service['bench_cpu_cores'], '.2f')}, other load "
                f"{fmt(service['other_cpu_cores'], '.2f')} cores"
            )
            if c == s.goal_concurrency:  # right after the paced service, for a paired ratio
                runs["per_token"].append(
                    with_contention(run_per_token, ctx, c, watched=ctx.per_token)
                )
                _release(ctx.device)
                _log(
                    f"{tag} {c:>3} clients, a message per token: "
                    f"{runs['per_token'][-1]['tokens_per_s']:6.0f} tok/s"
                )
        if not seed_first:
            runs["seed"].append(with_contention(run_seed, ctx))
        runs["service"].append(points["service"])
        runs["ideal"].append(points["ideal"])
        _log(f"{tag} seed way {runs['seed'][-1]['tokens_per_s']:.0f} tok/s")
    # After every run of the seed way and the ideal: an engine that has lived in this
    # process leaves torch here slower (see grpc_overhead), and they run here.
    for repeat in range(repeats):
        runs["grpc_overhead"].append(with_contention(grpc_overhead, ctx))
        o = runs["grpc_overhead"][-1]
        _log(
            f"[{repeat + 1}/{repeats}] one request {o['grpc_ms']:.1f} ms gRPC, "
            f"{o['in_process_ms']:.1f} in-process"
        )
    _log(f"training {s.adapters} adapters through the service")
    adapters = train_adapters(ctx)
    for repeat in range(repeats):
        for kind in _order(("mixed", "same"), repeat):
            runs[kind].append(with_contention(run_adapters, ctx, adapters, kind))
        _log(
            f"[{repeat + 1}/{repeats}] {s.adapters} clients: one adapter each "
            f"{runs['mixed'][-1]['tokens_per_s']:.0f} tok/s, all on one "
            f"{runs['same'][-1]['tokens_per_s']:.0f} tok/s"
        )
    for repeat in range(repeats):
        runs["co_serving"].append(with_contention(co_serving, ctx, repeat, adapters[0]))
        co = runs["co_serving"][-1]
        _log(
            f"[{repeat + 1}/{repeats}] co-serving p50 {co['idle']['latency_p50_ms']:.0f} -> "
            f"{fmt(co['training'].get('latency_p50_ms'), '.0f')} ms; training "
            f"{fmt(co['train_steps_per_s_alone'], '.2f')} -> "
            f"{fmt(co['train_steps_per_s_during'], '.2f')} steps/s"
        )
    return runs


def with_contention(
    fn: Callable[..., dict[str, Any]],
    ctx: Context,
    *args: Any,
    watched: ServiceProcess | None = None,
) -> dict[str, Any]:
    """`fn(ctx, *args)`'s result, with the cores used meanwhile by the service's process
    (`watched`, ctx.service unless given; "server_cpu_cores": all its threads, training
    included), by this process ("bench_cpu_cores": the clients and their channels, or the
    seed way's or the ideal's own compute) and by every other process ("other_cpu_cores")."""
    before = cpu_snapshot([(watched or ctx.service).pid])
    result = fn(ctx, *args)
    usage = before.usage() if before is not None else None
    result["server_cpu_cores"] = usage.watched if usage is not None else None
    result["bench_cpu_cores"] = usage.process if usage is not None else None
    result["other_cpu_cores"] = usage.other if usage is not None else None
    return result


def _order(items: Sequence[str], repeat: int) -> list[str]:
    """This repeat's order of `items`, rotated as bench.common.rotations does."""
    return list(rotations(items, repeat + 1))[-1]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM ends the run through its `finally` blocks, so that the service stops too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    quiet_libraries()
    s = settings_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    output = args.output or RESULTS / ("generate-quick.json" if args.quick else "generate.json")
    source = source_revision(tuneserve.__file__)  # now: the code imported, not a later commit

    # What the service's process gets too: the same intra-op threads as the seed way, the
    # ideal and the in-process engine, which run here.
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        work = Path(tmp)
        model_dir, tokenizer, n_params = own_thread(build_model_dir)(
            work / "model", s.shape, seed=s.seed
        )
        config = server_config(s, args, model_dir, work / "data")
        device = resolve_device(config.device)  # as the service resolves them
        dtype = resolve_dtype(config.dtype, device)
        service = ServiceProcess(config, threads=threads)
        per_token: ServiceProcess | None = None
        try:
            per_token_config = dataclasses.replace(
                config, stream_interval_ms=0.0, data_dir=work / "data-per-token"
            ).validate()
            per_token = ServiceProcess(per_token_config, threads=threads)
            _log(
                f"service: pid {service.pid} on {service.target}, {threads} torch threads; "
                f"per-token streaming: pid {per_token.pid} on {per_token.target}"
            )
            reference = own_thread(load_model)(str(model_dir), device=device, dtype=dtype).eval()
            train_mix = LengthMix(short=s.train_tokens, long_fraction=0.0)
            ctx = Context(
                settings=s,
                service=service,
                per_token=per_token,
                config=config,
                local_adapters=work / "local-adapters",
                tokenizer=tokenizer,
                reference=reference,
                device=device,
                prompts=make_prompts(tokenizer, s),
                train_rows=make_rows(s.train_rows, tokenizer, mix=train_mix, seed=s.seed + 1),
                adapter_rows=make_rows(8, tokenizer, mix=train_mix, seed=s.seed + 2),
            )
            lengths = sorted(len(tokenizer(p)["input_ids"]) for p in ctx.prompts)
            _log(
                f"model {n_params / 1e6:.2f}M parameters on {device} ({dtype}); "
                f"{len(lengths)} prompts of {lengths[0]}-{lengths[-1]} tokens "
                f"(median {lengths[len(lengths) // 2]}), {s.max_new_tokens} new tokens each"
            )
            runs = measure(ctx, args.repeats)
        finally:
            service.stop()
            if per_token is not None:
                per_token.stop()
        server_settings = {
            **_server_settings(config),
            "process": "own (tuneserve serve)",
            "torch_threads": threads,
        }

    report = summarise(s, runs, stream_interval_ms=config.stream_interval_ms)
    results = {
        "benchmark": "generate",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": environment(device),
        "source": source,
        "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick,
        "repeats": args.repeats,
        **report,
        "model": {**s.shape.as_dict(), "vocab_size": len(tokenizer), "parameters": n_params},
        "server": server_settings,
        "workload": {
            "prompts": len(lengths),
            "prompt_tokens": {
                "min": lengths[0],
                "median": lengths[len(lengths) // 2],
                "max": lengths[-1],
                "mean": sum(lengths) / len(lengths),
            },
            "max_new_tokens": s.max_new_tokens,
            "decoding": "greedy",
            "concurrency": list(s.concurrency),
            "requests_per_client": {str(c): s.requests_per_client(c) for c in s.concurrency},
            "seed_requests": s.seed_requests,
            "adapters": s.adapters,
            "overhead_trials": s.overhead_trials,
            "co_serving": {
                "clients": s.coserve_clients,
                "requests_per_client": s.coserve_requests_per_client,
                "alone_window_s": s.coserve_alone_s,
                "train_rows": s.train_rows,
                "train_batch_size": s.train_batch_size,
                "train_tokens_per_step": s.train_batch_size * _mean_row_tokens(ctx),
            },
            "seed": s.seed,
        },
        "runs": runs,
    }
    write_json(output, results)
    print(table(report))
    print(f"\nwrote {output}")
    return 1 if args.check and not report["all_goals_met"] else 0


def _server_settings(config: ServerConfig) -> dict[str, Any]:
    """The server settings the figures depend on; co-serving ones where this version of
    the service has them."""
    names = (
        "max_batch_size",
        "max_loaded_adapters",
        "max_queued_requests",
        "training_yield_s",
        "stream_interval_ms",
    )
    return {name: getattr(config, name) for name in names if hasattr(config, name)}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
