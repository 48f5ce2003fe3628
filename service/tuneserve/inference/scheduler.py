"""Continuous batching: every running request advances one token per forward pass, all of
them in one batch whatever adapter each uses (batched LoRA, inference/lora_batch.py: each
row through its own adapter or the base model), and new requests join between steps
instead of waiting for the batch to drain.

Policy, in the order the loop applies it each step:
1. Adapter commands (load, pin, unload) run between steps, never during one.
2. Admission: waiting requests are taken first come, first served, up to `max_batch_size`
   running; one whose adapter cannot be loaded yet (every cache slot busy or pinned) is
   skipped for now, and the ones behind it may go first. The requests admitted together are
   prefilled together (one forward, each row through its own adapter) and merged into the
   batch.
3. One decoding step for the whole batch; each row samples with its own parameters and
   seeded generator, its text is streamed at once, and rows that finished, were cancelled
   or whose caller went away leave the batch and free their memory.
A row whose numbers go wrong fails alone: scores that are not finite (an adapter with an
infinite scaling, a temperature or repetition penalty that overflows them) or a sampling
step that raises end that request with a typed error, at prefill or at any step, and the
rows beside it get their tokens as if it had never been there. Rows never mix in a forward
(each attends to its own cache row, through its own adapter), and a row that leaves has its
cache room overwritten or zeroed before another row uses it (kv_cache.GrowingLayer), so its
NaN cannot reach them later either. Only a forward that raises fails every row in it.
The waiting queue is bounded: past `max_queue` a request is refused (RESOURCE_EXHAUSTED with
a retry hint) rather than queued without end.

One thread owns the model: `submit` and `call` may be called from any thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers import PreTrainedTokenizerBase as Tokenizer

from tuneserve.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, TuneserveError
from tuneserve.inference.adapters import AdapterCache
from tuneserve.inference.batch import DecodeBatch
from tuneserve.inference.detokenize import IncrementalDecoder
from tuneserve.inference.kv_cache import growing_cache
from tuneserve.inference.params import FinishReason, GenerationChunk, SamplingParams

log = logging.getLogger(__name__)

R = TypeVar("R")
IDLE_WAIT_S = 0.05
# What sampling gives a row: its next token, or the error that ends it alone.
Sampled = int | Exception


class Sink(Protocol):
    def put(self, item: GenerationChunk | BaseException) -> None: ...


def _new_queue() -> queue.SimpleQueue[GenerationChunk | BaseException]:
    return queue.SimpleQueue()


class GenerationObserver(Protocol):
    """Receives per-token and per-request timings (tuneserve.metrics.Metrics implements it)."""

    def first_token(self, seconds: float) -> None: ...

    def next_token(self, seconds: float) -> None: ...

    def generation_finished(
        self, *, outcome: str, seconds: float, prompt_tokens: int, generated_tokens: int
    ) -> None: ...


class _NoObserver:
    def first_token(self, seconds: float) -> None:
        pass

    def next_token(self, seconds: float) -> None:
        pass

    def generation_finished(self, **_: Any) -> None:
        pass


@dataclass(eq=False)
class Request:
    """One generation, from submission to its last chunk (put on `out`)."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter_id: str = ""
    # Where chunks go: a thread-safe queue, or anything with a thread-safe put (an event
    # loop sink, so async callers get each chunk without a thread of their own).
    out: Sink = field(default_factory=lambda: _new_queue())
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    # Decoding state, owned by the scheduler thread.
    history: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    decoder: IncrementalDecoder | None = None
    generator: torch.Generator | None = None
    processors: LogitsProcessorList | None = None
    # Set while the request counts as a user of its adapter (from admission to its end):
    # the count is given back exactly once, however the request ends.
    holds_adapter: bool = False
    finished: bool = False  # its last chunk or error was put on `out`


@dataclass
class SchedulerStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0
    tokens: int = 0
    peak_running: int = 0  # the largest batch so far


class Scheduler:
    def __init__(
        self,
        *,
        adapters: AdapterCache,
        tokenizer: Tokenizer,
        device: torch.device,
        max_batch_size: int,
        max_queue: int,
        max_positions: int | None = None,
        observer: GenerationObserver | None = None,
    ) -> None:
        """`max_positions`: the longest a row gets, prompt and generation (the batch's KV
        cache grows spare room up to it and `max_batch_size` rows, no further)."""
        self._adapters = adapters
        self._tokenizer = tokenizer
        self._device = device
        self._max_batch = max_batch_size
        self._max_queue = max_queue
        self._max_positions = max_positions
        self._observer: GenerationObserver = observer or _NoObserver()
        self._eos = tokenizer.eos_token_id
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._waiting: deque[Request] = deque()
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._batch = self._new_batch()
        self.stats = SchedulerStats()
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        # The decode thread has run torch since it started, so holds an OpenMP team.
        self._holds_team = False
        self._retire = False  # asked to hand the loop to a fresh thread when idle

    def start(self) -> None:
        self._thread.start()

    def release_team(self) -> None:
        """Let the decode thread's OpenMP team go while nothing is being generated: the
        loop moves to a fresh thread, which builds a team only when it next runs torch.

        Why: libgomp keeps a thread's team until the thread exits, and while it manages
        more threads than there are cores its workers barely spin before sleeping, so each
        of the thousands of small parallel operators of a training step pays to wake them.
        A job trained in the server, beside the idle decode thread's team, ran 10-20%
        slower than the same job alone (bench/train, 2 cores). Asynchronous: the thread
        goes between two turns of its loop, only with no request running or waiting."""
        if self._holds_team and not self._stopping:
            self._retire = True
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(10)

    @property
    def busy(self) -> bool:
        """Requests are running or waiting: the trainer yields the device (see jobs)."""
        return bool(self.stats.running or self.stats.waiting)

    def submit(self, request: Request) -> None:
        with self._lock:
            if len(self._waiting) >= self._max_queue:
                raise ResourceExhausted(
                    f"{len(self._waiting)} requests are waiting; retry shortly",
                    retry_after_s=1.0,
                )
            self._waiting.append(request)
            self.stats.waiting = len(self._waiting)
        self._wake.set()

    def call(self, fn: Callable[[], R]) -> R:
        """Run `fn` on the scheduler thread between steps (it owns the model) and wait."""
        future: Future[R] = Future()
        self._commands.put((fn, future))
        self._wake.set()
        return future.result(timeout=300)

    def _new_batch(self) -> DecodeBatch[Request]:
        return DecodeBatch.for_model(self._adapters.model)

    # --- the loop

    def _run(self) -> None:
        while not self._stopping:
            if self._retire and not self._batch and not self._waiting:
                self._retire = self._holds_team = False
                self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
                self._thread.start()
                return  # this thread ends, and its OpenMP team with it
            try:
                self._run_commands()
                self._admit()
            except Exception:  # never let one request end the loop that serves them all
                log.exception("scheduler error")
            if not self._batch:
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            self._holds_team = True
            try:
                self._step()
            except Exception as e:  # a failed step fails its rows, not the server
                log.exception("decoding step failed")
                for slot in self._batch.slots:
                    self._end(slot.owner, error=e)
                self._batch = self._new_batch()
            self.stats.running = len(self._batch)
            self.stats.peak_running = max(self.stats.peak_running, self.stats.running)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            self._holds_team = True  # commands load adapters, with torch
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

    def _admit(self) -> None:
        with self._lock:
            candidates = list(self._waiting)
        admitted: list[Request] = []
        for request in candidates:
            if len(self._batch) + len(admitted) >= self._max_batch:
                break
            if request.cancelled.is_set():
                self._dequeue(request)
                request.out.put(self._chunk(request, "", FinishReason.CANCELLED))
                self._finished(request, FinishReason.CANCELLED.value)
                continue
            try:
                if not self._adapters.ensure(request.adapter_id):
                    continue  # every slot busy: it waits, the ones behind may go first
            except Exception as e:  # a bad adapter fails its request, never the loop
                if not isinstance(e, TuneserveError):
                    log.exception("adapter %s failed to load", request.adapter_id)
                self._dequeue(request)
                request.out.put(e)
                self._finished(request, "ERROR")
                continue
            self._dequeue(request)
            self._adapters.acquire(request.adapter_id)
            request.holds_adapter = True
            admitted.append(request)
        if not admitted:
            return
        try:
            self._prefill(admitted)
        except Exception as e:
            log.exception("prefill failed")
            for request in admitted:  # the ones that finished at prefill have had their end
                if not request.finished:
                    self._end(request, error=e)

    def _dequeue(self, request: Request) -> None:
        with self._lock:
            self._waiting.remove(request)
            self.stats.waiting = len(self._waiting)

    @torch.inference_mode()
    def _prefill(self, requests: list[Request]) -> None:
        """One forward over the newcomers' left-padded prompts, then into the batch."""
        self._holds_team = True
        for request in requests:
            p = request.params
            assert p.seed is not None
            request.history = list(request.prompt_ids)
            request.decoder = IncrementalDecoder(self._tokenizer, p.stop)
            request.generator = torch.Generator(device=self._device).manual_seed(p.seed)
            request.processors = _processors(p)
        width = max(len(r.prompt_ids) for r in requests)
        pads = [width - len(r.prompt_ids) for r in requests]
        ids = torch.full((len(requests), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, (request, pad) in enumerate(zip(requests, pads, strict=True)):
            ids[i, pad:] = torch.tensor(request.prompt_ids)
            mask[i, pad:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            position_ids=positions.to(self._device),
            past_key_values=growing_cache(
                self._adapters.model.config,
                max_rows=self._max_batch,
                max_positions=self._max_positions,
            ),
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits are sampled
            adapters=[r.adapter_id for r in requests],
        )
        sampled = self._sample_batch(requests, out.logits[:, -1])
        keep: list[int] = []
        tokens: list[int] = []
        for i, (request, token) in enumerate(zip(requests, sampled, strict=True)):
            if isinstance(token, Exception):
                self._end(request, error=token)
            elif not self._emit(request, token):
                keep.append(i)
                tokens.append(token)
        if not keep:
            return
        cache = out.past_key_values
        if len(keep) < len(requests):
            cache.batch_select_indices(torch.tensor(keep, device=self._device))
        self._batch.add(
            [requests[i] for i in keep],
            cache,
            width=width,
            pads=[pads[i] for i in keep],
            next_tokens=tokens,
        )

    @torch.inference_mode()
    def _step(self) -> None:
        slots = self._batch.slots
        inputs = self._batch.inputs(self._device)
        logits = self._forward(**inputs, adapters=[s.owner.adapter_id for s in slots]).logits
        sampled = self._sample_batch([s.owner for s in slots], logits[:, -1])
        # A failed row feeds the pad token: it leaves the batch below, before any step.
        self._batch.advanced([t if isinstance(t, int) else self._pad for t in sampled])
        done = set()
        for i, (slot, token) in enumerate(zip(slots, sampled, strict=True)):
            request = slot.owner
            if request.cancelled.is_set():
                self._finish(request, "", FinishReason.CANCELLED)
                done.add(i)
            elif isinstance(token, Exception):
                self._end(request, error=token)
                done.add(i)
            elif self._emit(request, token):
                done.add(i)
        self.stats.peak_running = max(self.stats.peak_running, len(slots))
        self._batch.remove(done)
        self.stats.steps += 1
        self.stats.tokens += len(slots)

    def _forward(self, *, adapters: list[str], **inputs: Any) -> Any:
        return self._adapters.forward(adapters, **inputs)

    def _sample_batch(self, requests: list[Request], logits: torch.Tensor) -> list[Sampled]:
        """Each row's next token, or the error that ends that row alone.

        One argmax over every row is both the plain greedy rows' tokens and the check of
        every row: argmax takes NaN for the largest value, so a row's maximum is finite
        exactly when it holds no NaN, no +inf and something above -inf (which top-k and
        masks use to remove a token), the rows softmax and every processor can take. Tokens
        and verdicts come back in one device sync. A row that fails the check gets an
        error, not the token argmax happened to pick, and never reaches multinomial (which
        raises on the CPU, and on a GPU may trip a device-side assert that ends the
        process). The other rows sample one by one, each catching its own failure."""
        picks = logits.argmax(-1)
        top = logits.gather(-1, picks[:, None])[:, 0]
        finite, tokens = torch.stack([torch.isfinite(top).long(), picks]).tolist()
        sampled: list[Sampled] = []
        for i, request in enumerate(requests):
            if not finite[i]:
                sampled.append(_not_finite_logits(request))
            elif request.params.is_greedy and not request.processors:
                sampled.append(int(tokens[i]))
            else:
                try:
                    sampled.append(self._sample(request, logits[i]))
                except TuneserveError as e:
                    sampled.append(e)
                except Exception as e:  # a bug in one row's sampling fails that row only
                    log.exception("sampling failed for one request")
                    sampled.append(e)
        return sampled

    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        """One row's token from its finite logits, through its processors."""
        assert request.processors is not None
        scores = logits[None].float()
        if request.processors:  # penalties look at the whole history
            history = torch.tensor([request.history], device=logits.device)
            scores = request.processors(history, scores)  # type: ignore[arg-type]
            # -inf is how top-k, top-p and n-gram bans remove a token; NaN, +inf or nothing
            # left above -inf means the processors overflowed: the maximum is finite else.
            if not bool(torch.isfinite(scores.max())):
                raise _not_finite_scores(request)
        if request.params.is_greedy:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=request.generator))

    def _emit(self, request: Request, token: int) -> bool:
        """Stream what `token` adds; True when the request has finished."""
        assert request.decoder is not None
        now = time.monotonic()
        if request.last_token_at is None:
            self._observer.first_token(now - request.submitted_at)
        else:
            self._observer.next_token(now - request.last_token_at)
        request.last_token_at = now
        if token == self._eos:
            self._finish(request, request.decoder.flush(), FinishReason.EOS)
            return True
        request.generated.append(token)
        request.history.append(token)
        delta, stopped = request.decoder.push(request.generated)
        if stopped:
            self._finish(request, delta, FinishReason.STOP_SEQUENCE)
            return True
        if len(request.generated) >= request.params.max_new_tokens:
            self._finish(request, delta + request.decoder.flush(), FinishReason.LENGTH)
            return True
        if delta:
            request.out.put(self._chunk(request, delta, None))
        return False

    def _finish(self, request: Request, text: str, reason: FinishReason) -> None:
        request.out.put(self._chunk(request, text, reason))
        self._release(request)
        self._finished(request, reason.value)

    def _end(self, request: Request, *, error: BaseException) -> None:
        if request.finished:  # it already had its last chunk: one end per request
            return
        request.out.put(error)
        self._release(request)
        self._finished(request, "ERROR")

    def _release(self, request: Request) -> None:
        """Give back the request's use of its adapter, once: a second release would take
        the count of other rows still decoding through that adapter."""
        if request.holds_adapter:
            request.holds_adapter = False
            self._adapters.release(request.adapter_id)

    def _finished(self, request: Request, outcome: str) -> None:
        request.finished = True
        self._observer.generation_finished(
            outcome=outcome,
            seconds=time.monotonic() - request.submitted_at,
            prompt_tokens=len(request.prompt_ids),
            generated_tokens=len(request.generated),
        )

    @staticmethod
    def _chunk(request: Request, text: str, reason: FinishReason | None) -> GenerationChunk:
        return GenerationChunk(
            text=text,
            generated_tokens=len(request.generated),
            prompt_tokens=len(request.prompt_ids),
            seed=request.params.seed or 0,
            finish_reason=reason,
        )


def _not_finite_logits(request: Request) -> FailedPrecondition:
    """The model's own scores for this row are NaN or infinite: its adapter (or the base
    model, for this prompt) is broken, whatever the sampling parameters."""
    where = f"at generated token {len(request.generated) + 1}"
    if request.adapter_id:
        return FailedPrecondition(
            f"the scores for this request are not finite (NaN or infinity) {where}: adapter "
            f"{request.adapter_id!r} produces them (its weights or its scaling, lora_alpha, "
            "overflow); retrain or re-export it, or use another adapter",
            field="adapter_id",
        )
    return FailedPrecondition(
        f"the scores for this request are not finite (NaN or infinity) {where}: the base "
        "model produces them for this prompt"
    )


def _not_finite_scores(request: Request) -> InvalidArgument:
    """The model's scores were finite; the sampling parameters made them overflow."""
    p = request.params
    return InvalidArgument(
        f"the scores for this request are not finite (NaN or infinity) at generated token "
        f"{len(request.generated) + 1} after its sampling parameters were applied "
        f"(temperature={p.temperature!r}, repetition_penalty={p.repetition_penalty!r}): "
        "use a larger temperature (0 for greedy decoding) or a repetition_penalty nearer 1",
        field="parameters",
    )


def _processors(params: SamplingParams) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if not params.is_greedy:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors
