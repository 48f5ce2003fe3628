"""The inference engine: the one copy of the base model, the adapters loaded onto it
(`inference/adapters.py`) and the continuous-batching scheduler that decodes every request
in flight together (`inference/scheduler.py`). Requests are checked here, on the caller's
thread, before they queue: bad parameters, an unknown adapter or a prompt too long never
take a place in the batch."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import shutil
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase as Tokenizer

from tuneserve.config import ServerConfig
from tuneserve.data.rows import resolve_under_roots
from tuneserve.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from tuneserve.inference.adapters import (
    AdapterCache,
    check_servable,
    imported_info,
    read_lora_config,
)
from tuneserve.inference.classifier import Classifier
from tuneserve.inference.kv_cache import check_batchable
from tuneserve.inference.lora_batch import base_layers
from tuneserve.inference.lora_files import (
    CONFIG_FILE,
    ConfigError,
    check_patterns_finish,
    read_lora,
)
from tuneserve.inference.mailbox import LoopSink, Mailbox
from tuneserve.inference.params import (
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    resolve_params,
)
from tuneserve.inference.scheduler import (
    GenerationObserver,
    Request,
    Scheduler,
    SchedulerStats,
    Sink,
)
from tuneserve.inference.text_limits import check_text_size
from tuneserve.models import (
    load_config,
    load_model,
    load_tokenizer,
    max_positions,
    resolve_device,
    resolve_dtype,
)
from tuneserve.registry import AdapterInfo, AdapterRegistry
from tuneserve.torch_threads import run_in_own_thread
from tuneserve.vocabulary import check_adapter_id

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.05


@dataclass(frozen=True)
class AdapterState:
    loaded: list[str]
    pinned: set[str]
    loads: int
    evictions: int


class Engine:
    """Thread-safe: every public method may be called from any thread."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        registry: AdapterRegistry,
        observer: GenerationObserver | None = None,
    ) -> None:
        self._config = config
        self._observer = observer
        self._registry = registry
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer: Tokenizer | None = None
        self._scheduler: Scheduler | None = None
        self._adapters: AdapterCache | None = None
        self._max_positions = 0
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
            weakref.WeakKeyDictionary()
        )
        self._classifier = Classifier(
            base_model=config.base_model,
            registry=registry,
            device=self.device,
            dtype=self.dtype,
            max_tokens=config.max_prompt_tokens,
        )

    @property
    def ready(self) -> bool:
        return self._scheduler is not None

    @property
    def stats(self) -> SchedulerStats:
        return self._scheduler.stats if self._scheduler is not None else SchedulerStats()

    @property
    def busy(self) -> bool:
        return self._scheduler is not None and self._scheduler.busy

    def release_idle_threads(self) -> None:
        """While nothing is generated, the decode thread lets its OpenMP team go, so that a
        training job on this CPU runs as fast as alone (Scheduler.release_team)."""
        if self._scheduler is not None and self.device.type == "cpu":
            self._scheduler.release_team()

    def load(self) -> None:
        """Load the base model, start the scheduler, run one short generation to warm up."""
        # A model the batch cannot hold fails here, from its config, before its weights load.
        check_batchable(load_config(self._config.base_model))
        tokenizer = load_tokenizer(self._config.base_model)
        model = run_in_own_thread(
            lambda: load_model(self._config.base_model, device=self.device, dtype=self.dtype),
            name="model-load",
        )
        model.eval()
        self._max_positions = max_positions(model)
        self._adapters = AdapterCache(
            model=model,
            registry=self._registry,
            base_model=self._config.base_model,
            capacity=self._config.max_loaded_adapters,
        )
        scheduler = Scheduler(
            adapters=self._adapters,
            tokenizer=tokenizer,
            device=self.device,
            max_batch_size=self._config.max_batch_size,
            max_queue=self._config.max_queued_requests,
            # The longest row `_encode_prompt` lets through: the limits, within the context.
            max_positions=min(
                self._max_positions, self._config.max_prompt_tokens + self._config.max_new_tokens
            ),
            observer=self._observer,
        )
        scheduler.start()
        self.tokenizer, self._scheduler = tokenizer, scheduler
        warm = GenerationRequest(prompt="", params=SamplingParams(max_new_tokens=2, greedy=True))
        for _ in self.generate(warm, is_cancelled=lambda: False):
            pass
        log.info("model %s ready on %s", self._config.base_model, self.device)

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()

    def generate(
        self, request: GenerationRequest, *, is_cancelled: Callable[[], bool]
    ) -> Iterator[GenerationChunk]:
        """Chunks of new text as they are produced; the last carries the finish reason."""
        out: queue.SimpleQueue[GenerationChunk | BaseException] = queue.SimpleQueue()
        pending = self._submit(request, out)
        try:
            while True:
                try:
                    item = out.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if is_cancelled():
                        pending.cancelled.set()  # it leaves the batch at the next step
                    continue
                if isinstance(item, BaseException):
                    raise item
                chunk, error = _coalesce(item, out.get_nowait, queue.Empty)
                yield chunk
                if error is not None:
                    raise error
                if chunk.finish_reason is not None:
                    return
        finally:
            pending.cancelled.set()  # the consumer stopped early: free the slot

    async def generate_async(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """`generate` for an event loop: the decode thread hands each chunk straight to the
        loop (no thread per request); cancelling the consumer frees the request's slot."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:  # only this loop's thread gets here for this loop
            mailbox = self._mailboxes[loop] = Mailbox(
                loop, interval_s=self._config.stream_interval_ms / 1000
            )
        # Checked and tokenised on a thread: never on the event loop, which answers health.
        pending = await asyncio.to_thread(self._submit, request, LoopSink(mailbox, out))
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                chunk, error = _coalesce(item, out.get_nowait, asyncio.QueueEmpty)
                yield chunk
                if error is not None:
                    raise error
                if chunk.finish_reason is not None:
                    return
        finally:
            pending.cancelled.set()

    def _submit(self, request: GenerationRequest, out: Sink) -> Request:
        """Check the request on the caller's thread, then queue it for the decode loop."""
        if self._scheduler is None or self.tokenizer is None:
            raise Unavailable("the model is still loading")
        params = resolve_params(
            request.params,
            default_max_new_tokens=self._config.default_max_new_tokens,
            max_new_tokens=self._config.max_new_tokens,
        )
        if request.adapter_id:
            self._check_current(request.adapter_id)
        pending = Request(
            self._encode_prompt(request.prompt, params), params, request.adapter_id, out=out
        )
        self._scheduler.submit(pending)
        return pending

    def _check_current(self, adapter_id: str) -> None:
        """The adapter exists now (the shared index is read on every request: one deleted
        on any replica is refused here from its commit on) and fits this server; matrices
        loaded from another version (deleted and trained again, on another replica) are
        dropped, so the request gets the current one."""
        record = self._registry.record(check_adapter_id(adapter_id))
        check_servable(self._registry.info_of(record), self._config.base_model)
        adapters = self._adapters
        if adapters is not None and adapters.version_of(adapter_id) not in (None, record.version):
            log.info("adapter %s changed (version %s); reloading", adapter_id, record.version)
            self.drop_adapter(adapter_id)

    def load_adapter(self, adapter_id: str, *, pin: bool) -> AdapterState:
        """Load (and optionally pin) an adapter now, so its first request does not wait."""
        info = self._registry.get(check_adapter_id(adapter_id))
        check_servable(info, self._config.base_model)
        adapters = self._require_adapters()

        def command() -> None:
            was_pinned = adapter_id in adapters.pinned
            adapters.pin(adapter_id, pin)
            try:
                if not adapters.ensure(adapter_id):
                    raise Unavailable("every adapter slot is in use; retry shortly")
            except BaseException:
                adapters.pin(adapter_id, was_pinned)  # a refused load changes nothing
                raise

        self._call(command)
        return self.adapter_state()

    def unload_adapter(self, adapter_id: str) -> AdapterState:
        adapters = self._require_adapters()
        if adapter_id not in adapters.loaded:
            raise NotFound(f"adapter {adapter_id!r} is not loaded", field="adapter_id")

        def command() -> None:
            if not adapters.drop(adapter_id):
                raise Unavailable(f"adapter {adapter_id!r} is serving requests; retry shortly")

        self._call(command)
        return self.adapter_state()

    def import_adapter(self, path: str, adapter_id: str) -> AdapterInfo:
        """Register a PEFT LoRA adapter directory from an import root, once it is shown to
        fit the base model. Only safetensors weights are read (never pickles)."""
        check_adapter_id(adapter_id)
        if self._registry.exists(adapter_id):
            raise AlreadyExists(f"adapter {adapter_id!r} already exists", field="adapter_id")
        source = resolve_under_roots(
            path,
            self._config.adapter_import_roots,
            field="path",
            what="adapter",
            flag="--adapter-import-roots",
            directory=True,
        )
        read_lora_config(source)  # a bad config is refused before anything is copied
        weights = source / "adapter_model.safetensors"
        if not weights.is_file():
            raise InvalidArgument(
                "path: no adapter_model.safetensors there (pickled .bin weights are refused)",
                field="path",
            )
        adapters = self._require_adapters()
        # The copies are what is checked and registered, not the source, which may change
        # meanwhile; nothing is visible in the registry until `register` renames them in.
        staging = self._registry.staging_dir()
        try:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                # Each file too: a link inside the directory must not lead out of the roots.
                resolve_under_roots(
                    str(source / name),
                    self._config.adapter_import_roots,
                    field="path",
                    what="adapter",
                    flag="--adapter-import-roots",
                )
                try:
                    shutil.copyfile(source / name, staging / name)
                except OSError as e:
                    raise InvalidArgument(
                        f"path: {name} cannot be copied ({e.strerror})", field="path"
                    ) from None
            config = read_lora_config(staging)
            try:  # before any pattern is matched here, where a runaway one cannot be stopped
                check_patterns_finish(config, [name for name, _ in base_layers(adapters.model)])
            except ConfigError as e:
                raise InvalidArgument(f"path: {CONFIG_FILE}: {e}", field="path") from None
            # The very check a load makes (lora_files.read_lora), on the thread that owns
            # the model: an adapter registered here is one Generate can load.
            layers: list[str] = []
            self._call(
                lambda: layers.extend(read_lora(adapter_id, staging, adapters.model, field="path"))
            )
            info = imported_info(
                adapter_id=adapter_id,
                base_model=self._config.base_model,
                config=config,
                layers=layers,
            )
            return self._registry.register(staging, info)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once registered

    def drop_adapter(self, adapter_id: str) -> None:
        """Forget an adapter that was deleted or replaced on disk (one in use is unloaded
        when its running requests end; new ones get it as it is on disk now)."""
        self._classifier.drop(adapter_id)
        if self._adapters is not None:
            adapters = self._adapters
            self._call(lambda: adapters.invalidate(adapter_id))

    def adapter_state(self) -> AdapterState:
        a = self._require_adapters()
        return AdapterState(loaded=a.loaded, pinned=a.pinned, loads=a.loads, evictions=a.evictions)

    def classify(self, adapter_id: str, texts: list[str]) -> list[list[tuple[str, float]]]:
        """Label scores for each text with a classification adapter."""
        if self.tokenizer is None:
            raise Unavailable("the model is still loading")
        tokenizer = self.tokenizer
        # A text longer than the model's positions would index past its position table.
        limit = min(self._config.max_prompt_tokens, self._max_positions)
        return run_in_own_thread(
            lambda: self._classifier.classify(adapter_id, texts, tokenizer, max_tokens=limit),
            name="classify",
        )

    def layer_names(self) -> list[str] | None:
        """Names of the base model's modules (what LoRA target_modules may name), once the
        model is loaded."""
        if self._adapters is None:
            return None
        return [name for name, _ in self._adapters.model.named_modules() if name]

    # --- internals

    def _require_adapters(self) -> AdapterCache:
        if self._adapters is None:
            raise Unavailable("the model is still loading")
        return self._adapters

    def _call(self, fn: Callable[[], object]) -> None:
        assert self._scheduler is not None
        self._scheduler.call(fn)

    def _encode_prompt(self, prompt: str, params: SamplingParams) -> list[int]:
        assert self.tokenizer is not None
        check_text_size(prompt, self._config.max_prompt_tokens, field="prompt")
        ids: list[int] = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:  # an empty prompt starts from the beginning-of-sequence token
            ids = [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id]
        if len(ids) > self._config.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt: {len(ids)} tokens is over the limit of {self._config.max_prompt_tokens}",
                field="prompt",
            )
        if len(ids) + params.max_new_tokens > self._max_positions:
            raise InvalidArgument(
                f"parameters.max_new_tokens: {len(ids)} prompt tokens + {params.max_new_tokens} "
                f"new tokens is over the model's context of {self._max_positions}",
                field="parameters.max_new_tokens",
            )
        return ids


def _coalesce(
    first: GenerationChunk,
    get_nowait: Callable[[], GenerationChunk | BaseException],
    empty: type[Exception],
) -> tuple[GenerationChunk, BaseException | None]:
    """Merge the chunks already waiting into one: a caller that fell behind gets one message
    per wake-up instead of one per token. Returns an error that came after them, if any."""
    texts, last = [first.text], first
    while last.finish_reason is None:
        try:
            item = get_nowait()
        except empty:
            break
        if isinstance(item, BaseException):
            return dataclasses.replace(last, text="".join(texts)), item
        texts.append(item.text)
        last = item
    return dataclasses.replace(last, text="".join(texts)), None
