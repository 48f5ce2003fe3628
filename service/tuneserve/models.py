"""Loading the base model and tokenizer, shared by the trainer and the inference engine.
A request never makes the server fetch a model or run remote code: the base model is
chosen at start-up, and `trust_remote_code` is always off."""

from __future__ import annotations

import logging

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(base_model: str) -> Tokenizer:
    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        # Pad positions are masked from attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(base_model: str) -> PretrainedConfig:
    """The model's config alone (config.json): what it is, before any weights load."""
    return AutoConfig.from_pretrained(base_model, trust_remote_code=False)


def load_model(base_model: str, *, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    log.info("loading %s on %s as %s", base_model, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, trust_remote_code=False)
    return model.to(device)  # type: ignore[arg-type]  # transformers types .to narrowly


def load_classifier(
    base_model: str,
    *,
    labels: tuple[str, ...],
    pad_token_id: int,
    device: torch.device,
    dtype: torch.dtype,
) -> PreTrainedModel:
    """The base model with a fresh classification head of len(labels) outputs."""
    log.info("loading %s as a %d-way classifier on %s", base_model, len(labels), device)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model,
        dtype=dtype,
        trust_remote_code=False,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=pad_token_id,  # decoder-only classifiers find the last real token by it
    )
    return model.to(device)


def max_positions(model: PreTrainedModel) -> int:
    """The longest sequence the model takes (its position table), or a huge number."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 20
