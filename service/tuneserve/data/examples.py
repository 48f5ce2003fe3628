"""Rows to training examples: tokenised, loss masked, end-of-sequence appended, and padded
per batch (never to a fixed maximum)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from tuneserve.data.chat_template import TemplateRenderer, shared_renderer, special_tokens_of
from tuneserve.data.rows import Row
from tuneserve.vocabulary import DatasetFormat

IGNORE_INDEX = -100  # label value the loss skips
_CHAT_CHUNK_ROWS = 256  # chat rows rendered per call: their renderings are held at once


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def encode_rows(
    rows: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    *,
    dataset_format: DatasetFormat,
    max_seq_length: int,
    mask_prompt: bool = True,
) -> list[Example]:
    """Text rows train on every token; prompt/response rows on the response only (unless
    `mask_prompt` is off, as article 4's "loss on all tokens" variant does). The
    end-of-sequence token is appended so the model learns to stop; it is cut off with the
    rest when a row is truncated, since such a row did not end there."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-sequence token")
    examples = []
    if dataset_format is DatasetFormat.TEXT:
        encoded = tokenizer([r["text"] for r in rows], add_special_tokens=True)["input_ids"]
        for ids in encoded:
            ids = ([*list(ids), eos])[:max_seq_length]
            examples.append(Example(ids, list(ids)))
    else:
        prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=True)["input_ids"]
        responses = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
        for p, r in zip(prompts, responses, strict=True):
            ids = (list(p) + list(r) + [eos])[:max_seq_length]
            prompt_labels = [IGNORE_INDEX] * len(p) if mask_prompt else list(p)
            labels = (prompt_labels + list(r) + [eos])[:max_seq_length]
            examples.append(Example(ids, labels))
    return examples


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example in the batch; pad positions are masked from attention and
    from the loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(
    examples: Sequence[Example], pad_token_id: int, capacity: int
) -> dict[str, torch.Tensor]:
    """Padding-free: the examples laid end to end in rows of at most `capacity` tokens
    (first fit, longest first), each with position ids restarting at 0 and no attention
    mask, so the model confines attention to each example (transformers builds a
    block-diagonal causal mask from position ids that restart, and flash-attention's varlen
    kernels read the same). Each example's first label is ignored: there the model would
    predict it from the example before. So the targets are the padded batch's, one for one.
    Rows shorter than the longest are filled with pad positions that form their own block,
    out of the loss."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(e.input_ids)
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit rows of {capacity}")
        for i, free in enumerate(room):
            if n <= free:
                bins[i].append(e)
                room[i] -= n
                break
        else:
            bins.append([e])
            room.append(capacity - n)
    width = capacity - min(room)
    input_ids = torch.full((len(bins), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    for row, members in enumerate(bins):
        start = 0
        for e in members:
            n = len(e.input_ids)
            input_ids[row, start : start + n] = torch.tensor(e.input_ids)
            labels[row, start + 1 : start + n] = torch.tensor(e.labels[1:])
            position_ids[row, start : start + n] = torch.arange(n)
            start += n
        position_ids[row, start:] = torch.arange(width - start)  # the pads' own block
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def encode_labelled(
    rows: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    *,
    labels: Sequence[str],
    max_seq_length: int,
) -> list[Example]:
    """Classification rows: the text's tokens, and its label's index as the one label."""
    index = {label: i for i, label in enumerate(labels)}
    encoded = tokenizer([r["text"] for r in rows], add_special_tokens=True)["input_ids"]
    return [
        Example(list(ids)[:max_seq_length], [index[r["label"]]])
        for ids, r in zip(encoded, rows, strict=True)
    ]


def collate_labelled(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Like `collate`, with one class index per row as the labels."""
    batch = collate([Example(e.input_ids, e.input_ids) for e in examples], pad_token_id)
    batch["labels"] = torch.tensor([e.labels[0] for e in examples], dtype=torch.long)
    return batch


def encode_chat(
    rows: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    *,
    chat_template: str | None,
    max_seq_length: int,
    mask_prompt: bool = True,
    renderer: TemplateRenderer | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[Example]:
    """Conversations rendered with the chat template, turn by turn, so each token is known
    to belong to one message: with `mask_prompt` only assistant turns (their role header
    included) are in the loss. The conversation ends with EOS so the model learns to stop.

    The template (None: the tokenizer's) is a user's program: it is rendered by `renderer`
    (default: the process's shared one) in worker processes under time, output and memory
    bounds, not on this thread. A template that fails raises InvalidArgument naming the row;
    `should_stop()` stops the rendering with RenderCancelled."""
    template = tokenizer.get_chat_template(chat_template)
    renderer = renderer or shared_renderer()
    special_tokens = special_tokens_of(tokenizer)
    examples = []
    # A chunk of rows at a time: every prefix of every conversation is rendered, and a
    # whole dataset's worth of those need not be in memory at once.
    for start in range(0, len(rows), _CHAT_CHUNK_ROWS):
        chunk = rows[start : start + _CHAT_CHUNK_ROWS]
        rendered = renderer.render_prefixes(
            [row["messages"] for row in chunk],
            template,
            special_tokens=special_tokens,
            should_stop=should_stop,
            first_row=start,
        )
        for row, texts in zip(chunk, rendered, strict=True):
            examples.append(
                _encode_conversation(
                    row["messages"],
                    texts,
                    tokenizer,
                    max_seq_length=max_seq_length,
                    mask_prompt=mask_prompt,
                )
            )
    return examples


def _encode_conversation(
    messages: Sequence[Mapping[str, str]],
    prefixes: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int,
    mask_prompt: bool,
) -> Example:
    """One conversation from its prefix renderings (`prefixes[i]`: messages[: i + 1])."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, (message, text) in enumerate(zip(messages, prefixes, strict=True)):
        # Templates render conversations as prefixes of one another; the turn is the rest.
        turn = text[len(rendered) :] if text.startswith(rendered) else text
        rendered = text
        # A template that writes the BOS itself ({{ bos_token }}) must not get a second.
        bos = tokenizer.bos_token
        add_special = i == 0 and not (bos and turn.startswith(bos))
        turn_ids = list(tokenizer(turn, add_special_tokens=add_special)["input_ids"])
        ids += turn_ids
        trained = not mask_prompt or message["role"] == "assistant"
        labels += turn_ids if trained else [IGNORE_INDEX] * len(turn_ids)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(
            eos if messages[-1]["role"] == "assistant" or not mask_prompt else IGNORE_INDEX
        )
    return Example(ids[:max_seq_length], labels[:max_seq_length])
