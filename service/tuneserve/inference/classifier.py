"""Classification with sequence-classification adapters (LoRA plus a trained head).

Memory policy (for now): each loaded classification adapter sits on its own copy of the
base model with its head, and at most `MAX_LOADED` are kept (least recently used dropped).
Sharing the generation engine's base weights needs the batched multi-adapter layer that
issue 4 brings; until then a classifier costs one base model of memory."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from tuneserve.data.examples import Example, collate
from tuneserve.errors import FailedPrecondition, InvalidArgument
from tuneserve.inference.text_limits import check_text_size
from tuneserve.models import load_classifier
from tuneserve.registry import AdapterRecord, AdapterRegistry
from tuneserve.vocabulary import Task, check_adapter_id

log = logging.getLogger(__name__)

MAX_LOADED = 2
MAX_TEXTS = 256
BATCH = 32

LabelScores = list[tuple[str, float]]


class Classifier:
    """Thread-safe: calls take turns on one lock."""

    def __init__(
        self,
        *,
        base_model: str,
        registry: AdapterRegistry,
        device: torch.device,
        dtype: torch.dtype,
        max_tokens: int,
    ) -> None:
        self._base_model = base_model
        self._registry = registry
        self._device = device
        self._dtype = dtype
        self._max_tokens = max_tokens
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, PeftModel] = OrderedDict()
        self._versions: dict[str, str] = {}  # the registry version each was loaded from

    def classify(
        self,
        adapter_id: str,
        texts: Sequence[str],
        tokenizer: Tokenizer,
        *,
        max_tokens: int | None = None,
    ) -> list[LabelScores]:
        """For each text, every label with its probability, most likely first. `max_tokens`:
        the longest text taken (default the configured limit)."""
        if not 1 <= len(texts) <= MAX_TEXTS:
            raise InvalidArgument(f"texts: give 1 to {MAX_TEXTS} texts", field="texts")
        limit = min(max_tokens or self._max_tokens, self._max_tokens)
        for i, text in enumerate(texts):
            check_text_size(text, limit, field=f"texts[{i}]")
        # The shared index, read now: a version trained after ours was loaded replaces it.
        record = self._registry.record(check_adapter_id(adapter_id))
        info = self._registry.info_of(record)
        if info.task != Task.CLASSIFICATION.value:
            raise FailedPrecondition(
                f"adapter {adapter_id!r} generates text; Classify needs a classification adapter",
                field="adapter_id",
            )
        encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                raise InvalidArgument(
                    f"texts[{i}]: {len(ids)} tokens is over the limit of {limit}",
                    field=f"texts[{i}]",
                )
        pad = tokenizer.pad_token_id
        assert pad is not None
        results: list[LabelScores] = []
        with self._lock, torch.inference_mode():
            model = self._model(record, info.labels, pad)
            for start in range(0, len(encoded), BATCH):
                chunk = [Example(ids, ids) for ids in encoded[start : start + BATCH]]
                batch = collate(chunk, pad)  # the training path's padding, labels unused
                logits = model(
                    input_ids=batch["input_ids"].to(self._device),
                    attention_mask=batch["attention_mask"].to(self._device),
                ).logits.float()
                for probs in torch.softmax(logits, dim=-1).tolist():
                    scores = sorted(zip(info.labels, probs, strict=True), key=lambda s: -s[1])
                    results.append(scores)
        return results

    def drop(self, adapter_id: str) -> None:
        with self._lock:
            self._loaded.pop(adapter_id, None)

    def _model(self, record: AdapterRecord, labels: tuple[str, ...], pad: int) -> PeftModel:
        adapter_id, version = record.id, record.version
        if self._versions.get(adapter_id) == version and adapter_id in self._loaded:
            self._loaded.move_to_end(adapter_id)
            return self._loaded[adapter_id]
        self._loaded.pop(adapter_id, None)  # another version: loaded again below
        base = load_classifier(
            self._base_model,
            labels=labels,
            pad_token_id=pad,
            device=self._device,
            dtype=self._dtype,
        )
        model = PeftModel.from_pretrained(base, str(self._registry.files_of(record)))
        model.eval()
        self._loaded[adapter_id] = model
        self._versions[adapter_id] = version
        while len(self._loaded) > MAX_LOADED:
            self._loaded.popitem(last=False)
        log.info("classification adapter %s loaded", adapter_id)
        return model
