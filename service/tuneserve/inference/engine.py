"""The inference engine: the one copy of the base model, the adapters loaded onto it, and the
decoding loop (KV cache, per-request sampling, stop sequences, cancellation per token).

Adapters are attached to the base model with peft and switched per request; the least
recently used one is dropped past `max_loaded_adapters`, and a new one is loaded and
validated before anything is evicted. Requests run one at a time under `_lock` for now;
batching concurrent requests across adapters is the next step (issue 4)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from peft import PeftModel
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tuneserve.config import ServerConfig
from tuneserve.errors import FailedPrecondition, InvalidArgument, Unavailable
from tuneserve.inference.classifier import Classifier
from tuneserve.inference.detokenize import IncrementalDecoder
from tuneserve.inference.params import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    resolve_params,
)
from tuneserve.jobs.model import Task, check_adapter_id
from tuneserve.models import (
    load_model,
    load_tokenizer,
    max_positions,
    resolve_device,
    resolve_dtype,
)
from tuneserve.registry import AdapterRegistry

log = logging.getLogger(__name__)


class Engine:
    """Thread-safe: `generate` may be called from many threads; they take turns."""

    def __init__(self, *, config: ServerConfig, registry: AdapterRegistry) -> None:
        self._config = config
        self._registry = registry
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, None] = OrderedDict()  # adapter ids, LRU first
        self._model: PreTrainedModel | PeftModel | None = None
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._classifier = Classifier(
            base_model=config.base_model,
            registry=registry,
            device=self.device,
            dtype=self.dtype,
            max_tokens=config.max_prompt_tokens,
        )
        self.tokenizer: Tokenizer | None = None
        self._max_positions = 0

    @property
    def ready(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the base model and run one short generation to warm it up."""
        tokenizer = load_tokenizer(self._config.base_model)
        model = load_model(self._config.base_model, device=self.device, dtype=self.dtype)
        model.eval()
        self.tokenizer = tokenizer
        self._model = model
        self._max_positions = max_positions(model)
        for _ in self._decode(
            [tokenizer.eos_token_id],
            SamplingParams(max_new_tokens=2, greedy=True, seed=0),
            lambda: False,
        ):
            pass
        log.info("model %s ready on %s", self._config.base_model, self.device)

    def generate(
        self, request: GenerationRequest, *, is_cancelled: Callable[[], bool]
    ) -> Iterator[GenerationChunk]:
        """Chunks of new text as they are produced; the last carries the finish reason."""
        if self._model is None or self.tokenizer is None:
            raise Unavailable("the model is still loading")
        params = resolve_params(
            request.params,
            default_max_new_tokens=self._config.default_max_new_tokens,
            max_new_tokens=self._config.max_new_tokens,
        )
        prompt_ids = self._encode_prompt(request.prompt, params)
        if request.adapter_id:
            check_adapter_id(request.adapter_id)
            self._registry.get(request.adapter_id)  # NotFound before waiting for the lock
        with self._lock, self._activated(request.adapter_id):
            yield from self._decode(prompt_ids, params, is_cancelled)

    def classify(self, adapter_id: str, texts: list[str]) -> list[list[tuple[str, float]]]:
        """Label scores for each text with a classification adapter."""
        if self.tokenizer is None:
            raise Unavailable("the model is still loading")
        return self._classifier.classify(adapter_id, texts, self.tokenizer)

    def drop_adapter(self, adapter_id: str) -> None:
        """Forget a loaded adapter (deleted, or replaced on disk)."""
        self._classifier.drop(adapter_id)
        with self._lock:
            if adapter_id in self._loaded and isinstance(self._model, PeftModel):
                if len(self._loaded) == 1:
                    self._model = self._model.unload()  # back to the bare base model
                else:
                    self._model.delete_adapter(adapter_id)
            self._loaded.pop(adapter_id, None)

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)

    # --- internals

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

    @contextlib.contextmanager
    def _activated(self, adapter_id: str) -> Iterator[None]:
        """Route the forward pass through `adapter_id`, or through the bare base model."""
        if not adapter_id:
            if isinstance(self._model, PeftModel):
                with self._model.disable_adapter():
                    yield
            else:
                yield
            return
        if adapter_id not in self._loaded:
            self._load_adapter(adapter_id)
        self._loaded.move_to_end(adapter_id)
        assert isinstance(self._model, PeftModel)
        self._model.set_adapter(adapter_id)
        yield

    def _load_adapter(self, adapter_id: str) -> None:
        info = self._registry.get(adapter_id)
        if info.task != Task.CAUSAL_LM.value:
            raise FailedPrecondition(
                f"adapter {adapter_id!r} is a classifier; use Classify", field="adapter_id"
            )
        if info.base_model != self._config.base_model:
            raise FailedPrecondition(
                f"adapter {adapter_id!r} was trained on {info.base_model}, "
                f"but this server serves {self._config.base_model}",
                field="adapter_id",
            )
        path = str(self._registry.path(adapter_id))
        if isinstance(self._model, PeftModel):
            self._model.load_adapter(path, adapter_name=adapter_id, is_trainable=False)
        else:
            assert self._model is not None
            self._model = PeftModel.from_pretrained(
                self._model, path, adapter_name=adapter_id, is_trainable=False
            )
        self._model.eval()
        self._loaded[adapter_id] = None
        log.info("adapter %s loaded", adapter_id)
        while len(self._loaded) > self._config.max_loaded_adapters:
            oldest = next(iter(self._loaded))
            self._model.delete_adapter(oldest)
            del self._loaded[oldest]
            log.info("adapter %s evicted", oldest)

    def _decode(
        self, prompt_ids: list[int], params: SamplingParams, is_cancelled: Callable[[], bool]
    ) -> Iterator[GenerationChunk]:
        assert self._model is not None and self.tokenizer is not None
        assert params.seed is not None
        eos = self.tokenizer.eos_token_id
        processors = _processors(params)
        generator = torch.Generator(device=self.device).manual_seed(params.seed)
        decoder = IncrementalDecoder(self.tokenizer, params.stop)
        ids = torch.tensor([prompt_ids], device=self.device)
        step_input, past = ids, None
        generated: list[int] = []

        def chunk(text: str, finish: FinishReason | None = None) -> GenerationChunk:
            return GenerationChunk(
                text=text,
                generated_tokens=len(generated),
                prompt_tokens=len(prompt_ids),
                seed=params.seed or 0,
                finish_reason=finish,
            )

        finish = FinishReason.LENGTH
        with torch.inference_mode():
            for _ in range(params.max_new_tokens):
                if is_cancelled():
                    finish = FinishReason.CANCELLED
                    break
                out = self._model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                scores = processors(ids, out.logits[:, -1, :].float())  # type: ignore[arg-type]
                if params.is_greedy:
                    token = scores.argmax(dim=-1, keepdim=True)
                else:
                    probs = torch.softmax(scores, dim=-1)
                    token = torch.multinomial(probs, 1, generator=generator)
                if int(token) == eos:
                    finish = FinishReason.EOS
                    break
                generated.append(int(token))
                ids = torch.cat([ids, token], dim=-1)
                step_input = token
                delta, stopped = decoder.push(generated)
                if stopped:
                    yield chunk(delta, FinishReason.STOP_SEQUENCE)
                    return
                if delta:
                    yield chunk(delta)
        yield chunk(decoder.flush(), finish)


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
