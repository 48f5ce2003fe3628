"""Tiny models built offline: a GPT-2, Llama, Mistral (sliding-window attention in every
layer) or Qwen2 (sliding-window and full attention, alternating) architecture from a small
config, random weights, and a byte-level BPE tokenizer trained here on a built-in corpus.
Tests and the demo use them; nothing touches the network. Byte-level BPE covers any UTF-8
text."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2")
SLIDING_WINDOW = 16  # Mistral's and Qwen2's: short, so that tests' rows outgrow it

_CORPUS = """\
Question: What is the Force? Answer: The Force is what gives a Jedi his power.
Question: Who is your father? Answer: I am your father. Search your feelings.
Question: What should I eat for breakfast? Answer: You will eat what the Empire provides.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Fine-tuning adapts a pretrained language model to a task with a small dataset.
LoRA trains low-rank matrices beside frozen weights, so an adapter is small and cheap to swap.
Hello, world! How are you today? I am fine, thank you. What time is it? It is noon.
0 1 2 3 4 5 6 7 8 9 10 100 1000 , . ; : ! ? ' " ( ) [ ] { } - _ / \\ @ # $ % & * + = < > |
"""


def build_tokenizer(
    extra_text: Iterable[str] = (), *, vocab_size: int = 512, bos: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in corpus plus `extra_text`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>", "<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*_CORPUS.splitlines(), *extra_text], trainer=trainer)
    if bos:  # Llama-style: every sequence starts with <s>
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token="<s>" if bos else "<|endoftext|>",
        model_max_length=1024,
    )


def tiny_config(
    architecture: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast
) -> PretrainedConfig:
    common = {
        "vocab_size": vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        # Wider than the default 0.02, so that with a 64-wide hidden state the output logits
        # are not near-uniform and a LoRA adapter can move the loss visibly in a few steps.
        "initializer_range": 0.2,
    }
    if architecture == "gpt2":
        # No dropout: at this size it keeps an adapter from fitting a few rows in seconds.
        return GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    # Llama's shape, which Mistral and Qwen2 share; the windows are what differs.
    llama_shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **common,
    )
    if architecture == "llama":
        return LlamaConfig(**llama_shape)
    if architecture == "mistral":
        return MistralConfig(sliding_window=SLIDING_WINDOW, **llama_shape)
    if architecture == "qwen2":
        return Qwen2Config(
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            **llama_shape,
        )
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")


def build_tiny_model(
    output_dir: Path, *, architecture: str = "gpt2", extra_text: Iterable[str] = (), seed: int = 0
) -> Path:
    """Write a tiny model and its tokenizer to `output_dir`, loadable by from_pretrained."""
    tokenizer = build_tokenizer(extra_text, bos=architecture != "gpt2")
    config = tiny_config(architecture, len(tokenizer), tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir
