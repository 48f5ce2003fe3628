"""The inference engine: the one copy of the base model, the adapters loaded onto it
(`inference/adapters.py`) and the continuous-batching scheduler that decodes every request
in flight together (`inference/scheduler.py`). Requests are checked here, on the caller's
thread, before they queue: bad parameters, an unknown adapter or a prompt too long never
take a place in the batch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase as Tokenizer

from tuneserve.config import ServerConfig
from tuneserve.errors import InvalidArgument, NotFound, Unavailable
from tuneserve.inference.adapters import (
    AdapterCache,
    check_servable,
)
from tuneserve.inference.classifier import Classifier
from tuneserve.inference.imports import import_adapter
from tuneserve.inference.lora_files import read_lora
from tuneserve.inference.params import (
    GenerationRequest,
    SamplingParams,
    resolve_params,
)
from tuneserve.inference.scheduler import (
    GenerationObserver,
    Request,
    Scheduler,
    SchedulerStats,
)
from tuneserve.inference.streams import ChunkStreams, Sink
from tuneserve.jobs.model import check_adapter_id
from tuneserve.models import (
    load_model,
    load_tokenizer,
    max_positions,
    resolve_device,
    resolve_dtype,
)
from tuneserve.registry import AdapterInfo, AdapterRegistry

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.05


@dataclass(frozen=True)
class AdapterState:
    loaded: list[str]
    pinned: set[str]
    loads: int
    evictions: int


class Engine(ChunkStreams):
    """Thread-safe: every public method may be called from any thread. `generate` and
    `generate_async` come from ChunkStreams."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        registry: AdapterRegistry,
        observer: GenerationObserver | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        """`after_step` runs on the decode thread after each pass of its loop, once the
        pass's chunks are put (the inference worker sends them to the server there)."""
        super().__init__()
        self._config = config
        self._after_step = after_step
        self._observer = observer
        self._registry = registry
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer: Tokenizer | None = None
        self._scheduler: Scheduler | None = None
        self._adapters: AdapterCache | None = None
        self._max_positions = 0
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

    def load(self) -> None:
        """Load the base model, start the scheduler, run one short generation to warm up."""
        tokenizer = load_tokenizer(self._config.base_model)
        model = load_model(self._config.base_model, device=self.device, dtype=self.dtype)
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
            observer=self._observer,
            after_step=self._after_pass,
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

    def submit(self, request: GenerationRequest, out: Sink) -> Request:
        """Check the request on the caller's thread, then queue it for the decode loop."""
        if self._scheduler is None or self.tokenizer is None:
            raise Unavailable("the model is still loading")
        params = resolve_params(
            request.params,
            default_max_new_tokens=self._config.default_max_new_tokens,
            max_new_tokens=self._config.max_new_tokens,
        )
        if request.adapter_id:
            check_servable(
                self._registry.get(check_adapter_id(request.adapter_id)), self._config.base_model
            )
        pending = Request(
            self._encode_prompt(request.prompt, params), params, request.adapter_id, out=out
        )
        self._scheduler.submit(pending)
        return pending

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
        """Register a user's PEFT LoRA adapter directory (inference/imports.py)."""
        return import_adapter(
            self._config, self._registry, path, adapter_id, check_fits=self.check_fits
        )

    def check_fits(self, adapter_id: str, source: str) -> None:
        """The very check a load makes (lora_files.read_lora), on the thread that owns the
        model: an adapter that passes is one Generate can load."""
        adapters = self._require_adapters()
        self._call(lambda: read_lora(adapter_id, Path(source), adapters.model, field="path"))

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
        return self._classifier.classify(adapter_id, texts, self.tokenizer)

    # --- internals

    def _after_pass(self) -> None:
        self._wake_loops()
        if self._after_step is not None:
            self._after_step()

    def _require_adapters(self) -> AdapterCache:
        if self._adapters is None:
            raise Unavailable("the model is still loading")
        return self._adapters

    def _call(self, fn: Callable[[], object]) -> None:
        assert self._scheduler is not None
        self._scheduler.call(fn)

    def _encode_prompt(self, prompt: str, params: SamplingParams) -> list[int]:
        assert self.tokenizer is not None
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
