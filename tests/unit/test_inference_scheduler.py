"""tuneserve.inference.scheduler: continuous batching over a tiny GPT-2 with real adapters.
Requests batched together give exactly what they give alone; the batch and the queue are
bounded; cancel, stop sequences, length and EOS end a request; errors reach the caller."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from tests.support import greedy_reference
from tuneserve.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TuneserveError,
)
from tuneserve.inference.adapters import AdapterCache
from tuneserve.inference.lora_batch import LoraPair
from tuneserve.inference.params import FinishReason, GenerationChunk, SamplingParams, resolve_params
from tuneserve.inference.scheduler import Request, Scheduler
from tuneserve.models import load_model, load_tokenizer
from tuneserve.registry import AdapterRegistry, local_registry
from tuneserve.tiny_models import SLIDING_WINDOW, build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
TIMEOUT_S = 30.0
PROMPTS = [
    "Question: Who is your father? Answer:",
    "The quick brown",
    "Hello",
    "LoRA trains low-rank matrices beside frozen weights, so",
    "Fine-tuning adapts a",
]


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path, add_adapter: Any
) -> AdapterRegistry:
    registry = local_registry(tmp_path_factory.mktemp("registry"))
    add_adapter(registry, tiny_gpt2, "a1", seed=1)
    add_adapter(registry, tiny_gpt2, "a2", seed=2)
    add_adapter(registry, tiny_gpt2, "classifier", seed=3, task="classification", labels=("n",))
    return registry


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2: Path) -> Any:
    return load_tokenizer(str(tiny_gpt2))


def fresh_model(base_dir: Path) -> Any:
    model = load_model(str(base_dir), device=CPU, dtype=torch.float32)
    model.eval()
    return model


def cache_for(base_dir: Path, registry: AdapterRegistry, capacity: int = 2) -> AdapterCache:
    return AdapterCache(
        model=fresh_model(base_dir), registry=registry, base_model=str(base_dir), capacity=capacity
    )


@pytest.fixture()
def make_scheduler(
    tiny_gpt2: Path, registry: AdapterRegistry, tokenizer: Any
) -> Iterator[Callable[..., Scheduler]]:
    """`make_scheduler(max_batch_size=, max_queue=, ...)`: a started scheduler over a fresh
    model; every one is stopped at the end of the test."""
    started: list[Scheduler] = []

    def make(
        *,
        max_batch_size: int = 8,
        max_queue: int = 16,
        capacity: int = 2,
        tokenizer: Any = tokenizer,
        registry: AdapterRegistry = registry,
        adapters: AdapterCache | None = None,
        max_positions: int | None = None,
    ) -> Scheduler:
        scheduler = Scheduler(
            adapters=adapters or cache_for(tiny_gpt2, registry, capacity),
            tokenizer=tokenizer,
            device=CPU,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            max_positions=max_positions,
        )
        started.append(scheduler)
        scheduler.start()
        return scheduler

    yield make
    for scheduler in started:
        scheduler.stop()


@pytest.fixture()
def scheduler(make_scheduler: Callable[..., Scheduler]) -> Scheduler:
    return make_scheduler()


def request(tokenizer: Any, prompt: str, adapter_id: str = "", **params: Any) -> Request:
    params.setdefault("max_new_tokens", 12)
    if "temperature" not in params:
        params.setdefault("greedy", True)
    resolved = resolve_params(
        SamplingParams(**params), default_max_new_tokens=16, max_new_tokens=500
    )
    return Request(tokenizer(prompt)["input_ids"], resolved, adapter_id)


@dataclass
class Result:
    text: str
    chunks: list[GenerationChunk]

    @property
    def last(self) -> GenerationChunk:
        return self.chunks[-1]


def result(req: Request, timeout: float = TIMEOUT_S) -> Result:
    """Every chunk up to the last; an error put on `out` is raised."""
    chunks: list[GenerationChunk] = []
    while not chunks or chunks[-1].finish_reason is None:
        item = req.out.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        chunks.append(item)
    assert all(c.finish_reason is None for c in chunks[:-1])
    return Result("".join(c.text for c in chunks), chunks)


def alone(scheduler: Scheduler, req: Request) -> Result:
    scheduler.submit(req)
    return result(req)


@contextmanager
def paused(scheduler: Scheduler) -> Iterator[None]:
    """Hold the decode thread between steps, so requests submitted meanwhile are admitted
    together when it resumes."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(TIMEOUT_S)

    caller = threading.Thread(target=scheduler.call, args=(hold,), daemon=True)
    caller.start()
    assert holding.wait(TIMEOUT_S)
    try:
        yield
    finally:
        release.set()
        caller.join(TIMEOUT_S)


def together(scheduler: Scheduler, requests: list[Request]) -> list[Result]:
    with paused(scheduler):
        for req in requests:
            scheduler.submit(req)
    return [result(req) for req in requests]


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def reference(
    tiny_gpt2: Path, registry: AdapterRegistry
) -> Callable[[str, list[int], int], list[int]]:
    """`reference(adapter_id, prompt_ids, n)`: greedy tokens of the base model or of one
    adapter loaded alone with plain peft."""
    models: dict[str, Any] = {}

    def tokens(adapter_id: str, prompt_ids: list[int], n: int) -> list[int]:
        if adapter_id not in models:
            model = fresh_model(tiny_gpt2)
            if adapter_id:
                model = PeftModel.from_pretrained(model, str(registry.path(adapter_id))).eval()
            models[adapter_id] = model
        return greedy_reference(models[adapter_id], prompt_ids, n)

    return tokens


# --- batching


def test_concurrent_greedy_requests_give_what_each_gives_alone(
    scheduler: Scheduler, tokenizer: Any, reference: Callable[..., list[int]]
) -> None:
    cases = list(zip(PROMPTS, ["", "a1", "a2", "a1", ""], strict=True))
    singles = [alone(scheduler, request(tokenizer, p, a)) for p, a in cases]
    assert scheduler.stats.peak_running == 1
    requests = [request(tokenizer, p, a) for p, a in cases]
    batched = together(scheduler, requests)
    assert scheduler.stats.peak_running == len(cases)  # they really ran in one batch

    for req, one, many in zip(requests, singles, batched, strict=True):
        assert many.text == one.text
        assert many.last.finish_reason == one.last.finish_reason
        assert many.last.generated_tokens == one.last.generated_tokens
        assert many.last.prompt_tokens == len(req.prompt_ids)
        # ...and both are what the base model or the adapter alone generates with plain peft
        tokens = reference(req.adapter_id, req.prompt_ids, req.params.max_new_tokens)
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        assert one.text == tokenizer.decode(tokens, skip_special_tokens=True)
    # the adapters are really applied: the same prompt gives three different texts
    texts = {a: alone(scheduler, request(tokenizer, PROMPTS[0], a)).text for a in ("", "a1", "a2")}
    assert len(set(texts.values())) == 3


def test_a_sliding_window_model_batched_gives_what_it_gives_alone_past_its_window(
    make_scheduler: Callable[..., Scheduler], tmp_path: Path
) -> None:
    """Mistral attends within SLIDING_WINDOW positions: rows of different lengths that
    outgrow it, joining a running batch, each give plain transformers' greedy tokens."""
    mistral = build_tiny_model(tmp_path / "mistral", architecture="mistral")
    tokenizer = load_tokenizer(str(mistral))
    registry = local_registry(tmp_path / "registry")
    adapters = AdapterCache(
        model=fresh_model(mistral), registry=registry, base_model=str(mistral), capacity=1
    )
    scheduler = make_scheduler(adapters=adapters, tokenizer=tokenizer, registry=registry)
    requests = [request(tokenizer, p, max_new_tokens=2 * SLIDING_WINDOW) for p in PROMPTS]
    scheduler.submit(requests[0])
    wait_until(lambda: scheduler.stats.running == 1)
    for req in requests[1:]:
        scheduler.submit(req)
    results = [result(req) for req in requests]
    assert scheduler.stats.peak_running > 1
    model = fresh_model(mistral)
    for req, got in zip(requests, results, strict=True):
        assert len(req.prompt_ids) + got.last.generated_tokens > SLIDING_WINDOW
        tokens = greedy_reference(model, req.prompt_ids, req.params.max_new_tokens)
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        assert req.generated == tokens


def test_a_seeded_sampled_request_gives_the_same_text_alone_and_in_a_batch(
    scheduler: Scheduler, tokenizer: Any
) -> None:
    def sampled(seed: int, adapter_id: str = "") -> Request:
        return request(
            tokenizer,
            PROMPTS[1],
            adapter_id,
            temperature=1.0,
            top_k=50,
            seed=seed,
            max_new_tokens=16,
        )

    one = alone(scheduler, sampled(1234))
    assert one.last.seed == 1234
    assert alone(scheduler, sampled(1234)).text == one.text  # reproducible
    assert alone(scheduler, sampled(4321)).text != one.text  # really sampled
    others = [
        request(tokenizer, PROMPTS[0], "a1"),
        sampled(99, "a2"),
        request(tokenizer, PROMPTS[3]),
    ]
    batched = together(scheduler, [others[0], sampled(1234), *others[1:]])
    assert scheduler.stats.peak_running == 4
    assert batched[1].text == one.text
    assert batched[1].last.seed == 1234


def test_the_batch_never_holds_more_than_max_batch_size(
    make_scheduler: Callable[..., Scheduler], tokenizer: Any
) -> None:
    scheduler = make_scheduler(max_batch_size=2)
    requests = [
        request(tokenizer, p, a) for p, a in zip(PROMPTS[:4], ["", "a1", "a2", ""], strict=True)
    ]
    with paused(scheduler):
        for req in requests:
            scheduler.submit(req)
        assert scheduler.stats.waiting == 4
        assert scheduler.busy
    results = [result(r) for r in requests]
    assert all(r.last.finish_reason is FinishReason.LENGTH for r in results)
    assert all(r.last.generated_tokens == 12 for r in results)
    assert scheduler.stats.peak_running == 2
    wait_until(lambda: not scheduler.busy)
    assert scheduler.stats.waiting == 0


def test_the_kv_cache_grows_no_room_past_the_batch_size(
    make_scheduler: Callable[..., Scheduler], tokenizer: Any
) -> None:
    """Four rows, then a fifth joins: without a limit the cache would make room for six
    rows (half as much again)."""
    scheduler = make_scheduler(max_batch_size=5, max_positions=300)

    def room() -> set[tuple[int, int | None]]:
        cache = scheduler._batch.cache
        assert cache is not None
        return {(layer._buffers()[0].shape[0], layer._max_positions) for layer in cache.layers}

    requests = [request(tokenizer, p, max_new_tokens=200) for p in PROMPTS]
    with paused(scheduler):
        for req in requests[:4]:
            scheduler.submit(req)
    wait_until(lambda: scheduler.stats.running == 4)
    scheduler.submit(requests[4])
    wait_until(lambda: scheduler.stats.running == 5)
    assert scheduler.call(room) == {(5, 300)}
    for req in requests:
        req.cancelled.set()
    assert {result(r).last.finish_reason for r in requests} == {FinishReason.CANCELLED}


def test_a_full_queue_refuses_with_a_retry_hint(
    make_scheduler: Callable[..., Scheduler], tokenizer: Any
) -> None:
    scheduler = make_scheduler(max_batch_size=1, max_queue=1)
    long = request(tokenizer, PROMPTS[0], max_new_tokens=450)
    scheduler.submit(long)
    wait_until(lambda: scheduler.stats.running == 1)  # admitted: the queue is empty again
    waiting = request(tokenizer, PROMPTS[1])
    scheduler.submit(waiting)  # the batch is full: it waits
    refused = request(tokenizer, PROMPTS[2])
    with pytest.raises(ResourceExhausted) as exc:
        scheduler.submit(refused)
    assert exc.value.retry_after_s > 0
    assert "waiting" in exc.value.message
    assert waiting.out.empty()

    long.cancelled.set()
    assert result(long).last.finish_reason is FinishReason.CANCELLED
    assert result(waiting).last.finish_reason is FinishReason.LENGTH
    scheduler.submit(refused)  # room again
    assert result(refused).last.finish_reason is FinishReason.LENGTH


# --- how a request ends


def test_a_cancelled_request_ends_and_leaves_the_batch(
    make_scheduler: Callable[..., Scheduler],
    tiny_gpt2: Path,
    registry: AdapterRegistry,
    tokenizer: Any,
) -> None:
    cache = cache_for(tiny_gpt2, registry)
    scheduler = make_scheduler(adapters=cache)
    stays = request(tokenizer, PROMPTS[0], max_new_tokens=10)
    goes = request(tokenizer, PROMPTS[1], "a1", max_new_tokens=450)
    scheduler.submit(goes)
    wait_until(lambda: scheduler.stats.running == 1)
    scheduler.submit(stays)
    goes.cancelled.set()
    ended = result(goes)
    assert ended.last.finish_reason is FinishReason.CANCELLED
    assert ended.last.generated_tokens < 450
    assert result(stays).last.finish_reason is FinishReason.LENGTH
    wait_until(lambda: scheduler.stats.running == 0)
    assert not scheduler.busy
    # the cancelled request no longer holds its adapter: it can be unloaded
    assert scheduler.call(lambda: cache.drop("a1")) is True
    assert cache.loaded == []


def test_a_request_cancelled_while_waiting_never_runs(scheduler: Scheduler, tokenizer: Any) -> None:
    req = request(tokenizer, PROMPTS[0], "a1")
    with paused(scheduler):
        scheduler.submit(req)
        req.cancelled.set()
    ended = result(req)
    assert ended.text == ""
    assert ended.last.finish_reason is FinishReason.CANCELLED
    assert ended.last.generated_tokens == 0
    assert scheduler.stats.steps == 0
    wait_until(lambda: not scheduler.busy)


def test_max_new_tokens_ends_with_length(scheduler: Scheduler, tokenizer: Any) -> None:
    one = alone(scheduler, request(tokenizer, PROMPTS[3], max_new_tokens=1))
    assert one.last.finish_reason is FinishReason.LENGTH
    assert one.last.generated_tokens == 1
    assert one.text
    assert scheduler.stats.steps == 0  # done at prefill: it never joined the batch
    req = request(tokenizer, PROMPTS[3], max_new_tokens=7)
    ended = alone(scheduler, req)
    assert ended.last.finish_reason is FinishReason.LENGTH
    assert ended.last.generated_tokens == 7
    assert ended.last.prompt_tokens == len(req.prompt_ids)
    assert [c.generated_tokens for c in ended.chunks] == sorted(
        c.generated_tokens for c in ended.chunks
    )


def test_a_stop_sequence_ends_the_text_before_it(scheduler: Scheduler, tokenizer: Any) -> None:
    full = alone(scheduler, request(tokenizer, PROMPTS[0], max_new_tokens=30)).text
    assert len(full) > 12
    stop = full[8:12]
    cut = full.index(stop)
    ended = alone(scheduler, request(tokenizer, PROMPTS[0], max_new_tokens=30, stop=(stop,)))
    assert ended.text == full[:cut]
    assert ended.last.finish_reason is FinishReason.STOP_SEQUENCE
    assert ended.last.generated_tokens < 30
    assert stop not in "".join(c.text for c in ended.chunks)


class EosTokenizer:
    """The tokenizer, but with another token id as the end of sequence."""

    def __init__(self, tokenizer: Any, eos_token_id: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_token_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)  # decode, pad_token_id, ...


def test_the_eos_token_ends_the_request_without_its_text(
    make_scheduler: Callable[..., Scheduler],
    tokenizer: Any,
    reference: Callable[..., list[int]],
) -> None:
    req = request(tokenizer, PROMPTS[0], max_new_tokens=30)
    tokens = reference("", req.prompt_ids, 30)
    eos = tokens[5]  # make a token the base model produces the end of sequence
    before = tokens[: tokens.index(eos)]
    scheduler = make_scheduler(tokenizer=EosTokenizer(tokenizer, eos))
    ended = alone(scheduler, req)
    assert ended.last.finish_reason is FinishReason.EOS
    assert ended.last.generated_tokens == len(before)
    assert ended.text == tokenizer.decode(before, skip_special_tokens=True)


# --- commands and errors


def test_call_runs_on_the_decode_thread_and_returns_its_result(scheduler: Scheduler) -> None:
    assert scheduler.call(lambda: threading.current_thread().name) == "decode"
    assert threading.current_thread().name != "decode"
    assert scheduler.call(lambda: 42) == 42


def test_call_raises_what_the_function_raised_and_the_scheduler_carries_on(
    scheduler: Scheduler, tokenizer: Any
) -> None:
    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        scheduler.call(fail)
    assert alone(scheduler, request(tokenizer, PROMPTS[2])).last.finish_reason is not None


@pytest.mark.parametrize(
    ("adapter_id", "error"),
    [("nobody", NotFound), ("../etc", InvalidArgument), ("classifier", FailedPrecondition)],
)
def test_an_adapter_that_cannot_be_served_is_reported_on_out(
    scheduler: Scheduler, tokenizer: Any, adapter_id: str, error: type
) -> None:
    req = request(tokenizer, PROMPTS[0], adapter_id)
    scheduler.submit(req)
    item = req.out.get(timeout=TIMEOUT_S)
    assert isinstance(item, error)
    assert item.field == "adapter_id"
    # the request left the queue and the scheduler goes on serving others
    wait_until(lambda: scheduler.stats.waiting == 0)
    assert alone(scheduler, request(tokenizer, PROMPTS[2], "a1")).last.finish_reason is not None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_adapter_that_fails_to_load_fails_its_request_not_the_scheduler(
    make_scheduler: Callable[..., Scheduler],
    tiny_gpt2: Path,
    tmp_path: Path,
    add_adapter: Any,
    tokenizer: Any,
) -> None:
    registry = local_registry(tmp_path / "adapters")
    add_adapter(registry, tiny_gpt2, "broken", seed=1)
    weights = registry.path("broken") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated file
    scheduler = make_scheduler(registry=registry)
    broken = request(tokenizer, PROMPTS[0], "broken")
    scheduler.submit(broken)
    try:
        item = broken.out.get(timeout=2)
    except queue.Empty:
        pytest.fail("the request got no answer")
    assert isinstance(item, BaseException)
    fine = request(tokenizer, PROMPTS[1])
    scheduler.submit(fine)
    try:
        assert result(fine, timeout=2).last.finish_reason is FinishReason.LENGTH
    except queue.Empty:
        pytest.fail("the scheduler stopped serving")


def test_a_failed_admission_releases_each_adapter_use_once(
    make_scheduler: Callable[..., Scheduler],
    tiny_gpt2: Path,
    registry: AdapterRegistry,
    tokenizer: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A newcomer that finishes at prefill has released its adapter already: when merging
    the others into the batch then fails, it is not released a second time (which would
    take the count of a row still decoding through that adapter, so it could be evicted)."""
    cache = cache_for(tiny_gpt2, registry)
    scheduler = make_scheduler(adapters=cache)
    running = request(tokenizer, PROMPTS[0], "a1", max_new_tokens=450)
    scheduler.submit(running)
    wait_until(lambda: scheduler.stats.running == 1)
    short = request(tokenizer, PROMPTS[1], "a1", max_new_tokens=1)  # ends at prefill
    failed = request(tokenizer, PROMPTS[2], "a1", max_new_tokens=10)

    def out_of_memory(*_: Any, **__: Any) -> None:
        raise torch.OutOfMemoryError("no room to merge")

    with paused(scheduler):
        monkeypatch.setattr(scheduler._batch, "add", out_of_memory)
        scheduler.submit(short)
        scheduler.submit(failed)
    assert result(short).last.finish_reason is FinishReason.LENGTH
    with pytest.raises(torch.OutOfMemoryError):
        result(failed)
    assert short.out.empty()  # one end per request: no error after its last chunk
    # the running row still holds a1: it cannot be dropped or evicted under it
    assert scheduler.call(lambda: cache._in_use["a1"]) == 1
    assert scheduler.call(lambda: cache.drop("a1")) is False
    running.cancelled.set()
    assert result(running).last.finish_reason is FinishReason.CANCELLED
    assert scheduler.call(lambda: cache.drop("a1")) is True


# --- one request's numbers go wrong: it fails alone


def poison(cache: AdapterCache, adapter_id: str) -> None:
    """Load `adapter_id` and make its scaling infinite, as an adapter saved with
    lora_alpha=inf would have: every layer it adapts then puts inf and NaN in its rows'
    hidden states, keys, values and logits. Written into the loaded slot, so it does not
    depend on what loading an adapter checks. Run on the scheduler's thread."""
    assert cache.ensure(adapter_id)
    lora = cache._lora
    slot = lora._slots[adapter_id]
    for layer in lora._layers.values():
        rank = layer.ranks.get(slot)
        if rank:
            a = layer.lora_a[slot, :rank].clone()
            b = layer.lora_b[slot, :rank].T.clone()  # back to peft's [out, r]
            layer.put(slot, LoraPair(a=a, b=b, scaling=math.inf))


def unchecked(tokenizer: Any, prompt: str, adapter_id: str = "", **params: Any) -> Request:
    """A request whose parameters never went through resolve_params: the scheduler must
    not rely on the checks made before it."""
    sampling = SamplingParams(max_new_tokens=12, seed=7, **params)
    return Request(tokenizer(prompt)["input_ids"], sampling, adapter_id)


def failure(req: Request) -> BaseException:
    """The error that ends `req` (after any chunks it streamed first)."""
    while True:
        item = req.out.get(timeout=TIMEOUT_S)
        if isinstance(item, BaseException):
            return item
        assert item.finish_reason is None, f"it finished with {item.finish_reason}"


def solo_tokens(reference: Callable[..., list[int]], tokenizer: Any, req: Request) -> list[int]:
    """What `req` generates alone (greedy, with plain peft), up to its end of sequence."""
    tokens = reference(req.adapter_id, req.prompt_ids, req.params.max_new_tokens)
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize(
    ("cause", "error", "named"),
    [
        ("adapter, greedy", FailedPrecondition, "'a2'"),
        ("adapter, sampled", FailedPrecondition, "'a2'"),
        ("temperature 1e-40", InvalidArgument, "temperature=1e-40"),
        ("repetition_penalty 1e-40", InvalidArgument, "repetition_penalty=1e-40"),
    ],
)
def test_a_request_whose_scores_are_not_finite_fails_alone_at_prefill(
    make_scheduler: Callable[..., Scheduler],
    tiny_gpt2: Path,
    registry: AdapterRegistry,
    tokenizer: Any,
    reference: Callable[..., list[int]],
    cause: str,
    error: type[TuneserveError],
    named: str,
) -> None:
    """Admitted with innocent requests (one prefill): the bad one ends with a typed error
    that says what is wrong; the others get exactly what they get alone."""
    cache = cache_for(tiny_gpt2, registry)
    scheduler = make_scheduler(adapters=cache)
    sampled = request(tokenizer, PROMPTS[1], temperature=1.0, top_k=50, seed=1234)
    sampled_alone = alone(scheduler, sampled).text
    bad = {
        "adapter, greedy": lambda: request(tokenizer, PROMPTS[2], "a2"),
        "adapter, sampled": lambda: request(tokenizer, PROMPTS[2], "a2", temperature=1.0, seed=5),
        "temperature 1e-40": lambda: unchecked(tokenizer, PROMPTS[2], temperature=1e-40),
        "repetition_penalty 1e-40": lambda: unchecked(
            tokenizer, PROMPTS[0], greedy=True, repetition_penalty=1e-40
        ),
    }[cause]()
    if bad.adapter_id:
        scheduler.call(lambda: poison(cache, "a2"))
    innocents = [
        request(tokenizer, PROMPTS[0]),
        request(tokenizer, PROMPTS[1], "a1"),
        request(tokenizer, PROMPTS[1], temperature=1.0, top_k=50, seed=1234),
        request(tokenizer, PROMPTS[3]),
    ]
    with paused(scheduler):
        for req in [*innocents[:2], bad, *innocents[2:]]:
            scheduler.submit(req)

    got = failure(bad)
    assert isinstance(got, error)
    assert isinstance(got, TuneserveError)  # for mypy: `error` is one
    assert "not finite (NaN or infinity)" in got.message
    assert named in got.message
    assert got.field == ("adapter_id" if bad.adapter_id else "parameters")
    assert bad.generated == []  # it failed on its first token
    results = [result(req) for req in innocents]
    assert scheduler.stats.peak_running == len(innocents)  # they decoded in one batch
    assert results[2].text == sampled_alone
    for req in (innocents[0], innocents[1], innocents[3]):
        assert req.generated == solo_tokens(reference, tokenizer, req)
    # the scheduler goes on serving, and the bad request gave back its adapter
    assert alone(scheduler, request(tokenizer, PROMPTS[4], "a1")).last.finish_reason is not None
    wait_until(lambda: not scheduler.busy)
    if bad.adapter_id:
        assert scheduler.call(lambda: cache.drop("a2")) is True


def test_a_request_whose_scores_turn_non_finite_in_a_step_fails_alone(
    make_scheduler: Callable[..., Scheduler],
    tiny_gpt2: Path,
    registry: AdapterRegistry,
    tokenizer: Any,
    reference: Callable[..., list[int]],
) -> None:
    """A sampled row whose adapter turns to inf while it decodes beside innocent rows ends
    with a typed error at that step; the innocents keep decoding their own tokens. Its
    last step wrote NaN keys and values into its cache row; a newcomer that joins into
    that row once the batch has grown past them has them under its left padding (masked,
    but 0 times NaN is NaN unless the padding is zeroed), and still gets exactly what it
    gets alone."""
    cache = cache_for(tiny_gpt2, registry)
    scheduler = make_scheduler(adapters=cache)
    innocents = [
        request(tokenizer, PROMPTS[0], max_new_tokens=200),
        request(tokenizer, PROMPTS[1], "a1", max_new_tokens=200),
    ]
    victim = request(tokenizer, PROMPTS[3], "a2", temperature=1.0, top_k=50, max_new_tokens=450)
    newcomer = request(tokenizer, PROMPTS[2], max_new_tokens=30)
    steps_since_victim = 0
    rows_at_join: list[int] = []  # the batch's rows when the newcomer was submitted
    step = scheduler._step

    def step_then_join() -> None:
        """On the decode thread, so the newcomer joins after an exact number of steps: one
        more than its prompt's length after the victim's last, when the NaN column lies
        under its padding."""
        nonlocal steps_since_victim
        step()
        if victim.finished and not rows_at_join:
            steps_since_victim += 1
            if steps_since_victim > len(newcomer.prompt_ids):
                rows_at_join.append(len(scheduler._batch))
                scheduler.submit(newcomer)

    def poison_while_running() -> int:
        scheduler._step = step_then_join  # type: ignore[method-assign]
        poison(cache, "a2")
        return len(scheduler._batch)

    with paused(scheduler):
        for req in [*innocents, victim]:  # the victim last: no other row moves into its row
            scheduler.submit(req)
    wait_until(lambda: scheduler.stats.steps >= 2)
    assert scheduler.call(poison_while_running) == 3
    got = failure(victim)
    assert isinstance(got, FailedPrecondition)
    assert got.field == "adapter_id"
    assert "not finite (NaN or infinity)" in got.message
    assert victim.generated  # it decoded fine before its adapter went bad

    result(newcomer)
    assert rows_at_join == [2]  # it joined the innocents, into the victim's row
    assert newcomer.generated == solo_tokens(reference, tokenizer, newcomer)
    for req in innocents:
        result(req)
        assert req.generated == solo_tokens(reference, tokenizer, req)
    wait_until(lambda: not scheduler.busy)
    assert scheduler.call(lambda: cache.drop("a2")) is True  # its use was given back


def test_release_team_hands_the_idle_loop_to_a_fresh_thread(
    make_scheduler: Callable[..., Scheduler], tokenizer: Any
) -> None:
    """A decode thread that has run torch leaves for a fresh one once nothing runs or
    waits (its OpenMP team goes with it, see Scheduler.release_team); a request running
    when it is asked is neither cut short nor changed, and generation goes on unchanged on
    the new thread. One that has not run torch stays."""
    scheduler = make_scheduler()
    untouched = scheduler._thread
    scheduler.release_team()
    time.sleep(0.2)
    assert scheduler._thread is untouched and untouched.is_alive()

    expected = alone(scheduler, request(tokenizer, "Luke, I am", max_new_tokens=30)).text
    first = scheduler._thread
    with paused(scheduler):
        running = request(tokenizer, "Luke, I am", max_new_tokens=30)
        scheduler.submit(running)
        scheduler.release_team()
    assert result(running).text == expected  # not cut short, not disturbed
    wait_until(lambda: scheduler._thread is not first and not first.is_alive())
    assert scheduler._thread.name == "decode"
    assert alone(scheduler, request(tokenizer, "Luke, I am", max_new_tokens=30)).text == expected
