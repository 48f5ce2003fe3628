"""tuneserve.data.examples: tokenisation, loss masking and per-batch padding."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from tuneserve.data.chat_template import RenderCancelled
from tuneserve.data.examples import (
    IGNORE_INDEX,
    Example,
    collate,
    collate_labelled,
    encode_chat,
    encode_labelled,
    encode_rows,
)
from tuneserve.errors import InvalidArgument
from tuneserve.jobs.model import DatasetFormat

TEXT = DatasetFormat.TEXT
PR = DatasetFormat.PROMPT_RESPONSE


def ids_of(tokenizer: Any, text: str, *, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def test_text_rows_train_on_every_token_and_end_with_eos(tokenizer: Any) -> None:
    [ex] = encode_rows(
        [{"text": "Hello, world!"}], tokenizer, dataset_format=TEXT, max_seq_length=512
    )
    expected = [*ids_of(tokenizer, "Hello, world!"), tokenizer.eos_token_id]
    assert ex.input_ids == expected
    assert ex.labels == expected
    assert ex.trained_tokens == len(expected)


def test_prompt_tokens_are_masked_and_response_plus_eos_trained(tokenizer: Any) -> None:
    prompt, response = "Question: Who is your father? Answer:", " I am your father."
    [ex] = encode_rows(
        [{"prompt": prompt, "response": response}],
        tokenizer,
        dataset_format=PR,
        max_seq_length=512,
    )
    p = ids_of(tokenizer, prompt)
    r = ids_of(tokenizer, response, special=False)
    eos = tokenizer.eos_token_id
    assert ex.input_ids == [*p, *r, eos]
    assert ex.labels == [IGNORE_INDEX] * len(p) + [*r, eos]
    assert ex.labels[-1] == eos  # the model learns to stop
    assert ex.trained_tokens == len(r) + 1
    assert tokenizer.decode(ex.input_ids[len(p) : -1]) == response


def test_bos_goes_on_the_prompt_only_and_is_masked(bos_tokenizer: Any) -> None:
    [ex] = encode_rows(
        [{"prompt": "Hello", "response": " world"}],
        bos_tokenizer,
        dataset_format=PR,
        max_seq_length=512,
    )
    bos = bos_tokenizer.bos_token_id
    assert ex.input_ids[0] == bos
    assert ex.input_ids.count(bos) == 1  # the response is not given a second <s>
    assert ex.labels[0] == IGNORE_INDEX


def test_long_rows_are_truncated_to_max_seq_length(tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 4
    full = ids_of(tokenizer, text)
    assert len(full) > 8
    [ex] = encode_rows([{"text": text}], tokenizer, dataset_format=TEXT, max_seq_length=8)
    assert ex.input_ids == full[:8]
    assert ex.labels == full[:8]
    # A truncated row did not end there: no end-of-sequence is taught.
    assert tokenizer.eos_token_id not in ex.labels


def test_truncation_applies_to_prompt_response_rows(tokenizer: Any) -> None:
    prompt = "Question: What should I eat for breakfast? Answer:"
    p = ids_of(tokenizer, prompt)
    [ex] = encode_rows(
        [{"prompt": prompt, "response": " You will eat what the Empire provides."}],
        tokenizer,
        dataset_format=PR,
        max_seq_length=len(p) + 2,
    )
    assert len(ex.input_ids) == len(ex.labels) == len(p) + 2
    assert ex.trained_tokens == 2


def test_a_row_whose_prompt_fills_max_seq_length_trains_nothing(tokenizer: Any) -> None:
    prompt = "The quick brown fox jumps over the lazy dog."
    [ex] = encode_rows(
        [{"prompt": prompt, "response": " yes"}], tokenizer, dataset_format=PR, max_seq_length=8
    )
    assert ex.trained_tokens == 0


def test_collate_pads_to_the_longest_in_the_batch_not_a_fixed_length() -> None:
    a = Example(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7])
    b = Example(input_ids=[8, 9, 10, 11, 12], labels=[8, 9, 10, 11, 12])
    batch = collate([a, b], pad_token_id=1)
    for key in ("input_ids", "labels", "attention_mask"):
        assert tuple(batch[key].shape) == (2, 5)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 1], [8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX],
        [8, 9, 10, 11, 12],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_collate_keeps_eos_labels_when_pad_is_eos(tokenizer: Any) -> None:
    """GPT-2 style tokenizers pad with the EOS id: only pad positions may be masked."""
    eos = tokenizer.eos_token_id
    examples = encode_rows(
        [{"text": "Hello"}, {"text": "Hello, world! How are you today?"}],
        tokenizer,
        dataset_format=TEXT,
        max_seq_length=512,
    )
    short, long = examples
    assert len(short.input_ids) < len(long.input_ids)
    batch = collate(examples, pad_token_id=eos)
    n = len(short.input_ids)
    labels, mask = batch["labels"].tolist(), batch["attention_mask"].tolist()
    assert labels[0][n - 1] == eos  # the real end-of-sequence is still learned
    assert labels[1][-1] == eos
    assert labels[0][n:] == [IGNORE_INDEX] * (len(long.input_ids) - n)
    assert mask[0] == [1] * n + [0] * (len(long.input_ids) - n)
    assert batch["input_ids"][0, n:].tolist() == [eos] * (len(long.input_ids) - n)


def test_encode_rows_needs_an_eos_token(tokenizer: Any) -> None:
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="end-of-sequence"):
        encode_rows([{"text": "x"}], NoEos(), dataset_format=TEXT, max_seq_length=8)  # type: ignore[arg-type]


def test_prompt_is_trained_too_when_mask_prompt_is_off(tokenizer: Any) -> None:
    prompt, response = "Question: Who is your father? Answer:", " I am your father."
    row = {"prompt": prompt, "response": response}
    [masked] = encode_rows([row], tokenizer, dataset_format=PR, max_seq_length=512)
    [ex] = encode_rows([row], tokenizer, dataset_format=PR, max_seq_length=512, mask_prompt=False)
    assert ex.input_ids == masked.input_ids  # the same tokens, only the loss differs
    assert ex.labels == ex.input_ids
    assert ex.trained_tokens == len(ex.input_ids) > masked.trained_tokens
    assert ex.labels[-1] == tokenizer.eos_token_id


def test_mask_prompt_off_still_truncates_labels_with_the_ids(tokenizer: Any) -> None:
    prompt = "The quick brown fox jumps over the lazy dog."
    [ex] = encode_rows(
        [{"prompt": prompt, "response": " yes"}],
        tokenizer,
        dataset_format=PR,
        max_seq_length=8,
        mask_prompt=False,
    )
    assert ex.input_ids == ids_of(tokenizer, prompt)[:8]
    assert ex.labels == ex.input_ids


# --- labelled rows (sequence classification)

LABELS = ("negative", "positive")


def test_labelled_rows_carry_their_label_index(tokenizer: Any) -> None:
    rows = [
        {"text": "I am fine, thank you.", "label": "positive"},
        {"text": "The lazy dog.", "label": "negative"},
    ]
    examples = encode_labelled(rows, tokenizer, labels=LABELS, max_seq_length=512)
    assert [e.input_ids for e in examples] == [ids_of(tokenizer, r["text"]) for r in rows]
    assert [e.labels for e in examples] == [[1], [0]]
    # The label order is the caller's, not alphabetical.
    flipped = encode_labelled(rows, tokenizer, labels=LABELS[::-1], max_seq_length=512)
    assert [e.labels for e in flipped] == [[0], [1]]


def test_labelled_rows_are_truncated_and_get_no_eos(tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 4
    [ex] = encode_labelled(
        [{"text": text, "label": "positive"}], tokenizer, labels=LABELS, max_seq_length=8
    )
    assert ex.input_ids == ids_of(tokenizer, text)[:8]
    assert ex.labels == [1]
    [short] = encode_labelled(
        [{"text": "Hello", "label": "negative"}], tokenizer, labels=LABELS, max_seq_length=512
    )
    assert tokenizer.eos_token_id not in short.input_ids


def test_collate_labelled_gives_one_class_index_per_row() -> None:
    a = Example(input_ids=[5, 6, 7], labels=[2])
    b = Example(input_ids=[8, 9, 10, 11], labels=[0])
    batch = collate_labelled([a, b], pad_token_id=1)
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [2, 0]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [8, 9, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


# --- chat rows

TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}### Human: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}### Assistant: {{ m['content'] }}\n"
    "{% else %}{{ m['content'] }}\n"
    "{% endif %}{% endfor %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is your father?"},
    {"role": "assistant", "content": "I am your father."},
    {"role": "user", "content": "No!"},
    {"role": "assistant", "content": "Search your feelings."},
]
RENDERED = (
    "Be brief.\n### Human: Who is your father?\n### Assistant: I am your father.\n"
    "### Human: No!\n### Assistant: Search your feelings.\n"
)


def chat(tokenizer: Any, messages: list[dict[str, str]], **kw: Any) -> Example:
    kw.setdefault("max_seq_length", 512)
    [ex] = encode_chat([{"messages": messages}], tokenizer, chat_template=TEMPLATE, **kw)
    return ex


def trained_text(tokenizer: Any, ex: Example) -> str:
    return str(tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX]))


def test_chat_decodes_to_the_rendered_conversation_plus_eos(tokenizer: Any) -> None:
    ex = chat(tokenizer, CHAT)
    assert tokenizer.decode(ex.input_ids[:-1]) == RENDERED
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert len(ex.labels) == len(ex.input_ids)


def test_chat_trains_on_assistant_turns_only(tokenizer: Any) -> None:
    ex = chat(tokenizer, CHAT)
    eos = tokenizer.eos_token_id
    assert trained_text(tokenizer, ex) == (
        "### Assistant: I am your father.\n### Assistant: Search your feelings.\n"
        + tokenizer.eos_token
    )
    # Every trained position is trained on its own token; the rest is masked.
    for token, label in zip(ex.input_ids, ex.labels, strict=True):
        assert label in (token, IGNORE_INDEX)
    assert ex.labels[-1] == eos  # the model learns to stop after the assistant
    # The system and first user turns come first and are all masked.
    head = len(tokenizer("Be brief.\n### Human: Who is your father?\n")["input_ids"])
    assert ex.labels[:head] == [IGNORE_INDEX] * head
    assert ex.labels[head] != IGNORE_INDEX


def test_chat_trains_on_everything_when_mask_prompt_is_off(tokenizer: Any) -> None:
    ex = chat(tokenizer, CHAT, mask_prompt=False)
    assert ex.labels == ex.input_ids
    assert ex.input_ids == chat(tokenizer, CHAT).input_ids


def test_chat_ending_with_a_user_turn_does_not_teach_eos(tokenizer: Any) -> None:
    ex = chat(tokenizer, CHAT[:4])
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert ex.labels[-1] == IGNORE_INDEX
    assert trained_text(tokenizer, ex) == "### Assistant: I am your father.\n"
    unmasked = chat(tokenizer, CHAT[:4], mask_prompt=False)
    assert unmasked.labels[-1] == tokenizer.eos_token_id


def test_chat_rows_are_truncated(tokenizer: Any) -> None:
    full = chat(tokenizer, CHAT)
    ex = chat(tokenizer, CHAT, max_seq_length=12)
    assert ex.input_ids == full.input_ids[:12]
    assert ex.labels == full.labels[:12]
    assert tokenizer.eos_token_id not in ex.input_ids


def test_chat_rows_are_encoded_one_example_each(tokenizer: Any) -> None:
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT[3:]}]
    examples = encode_chat(rows, tokenizer, chat_template=TEMPLATE, max_seq_length=512)
    assert [tokenizer.decode(e.input_ids[:-1]) for e in examples] == [
        "### Human: Who is your father?\n### Assistant: I am your father.\n",
        "### Human: No!\n### Assistant: Search your feelings.\n",
    ]


def test_chat_gets_the_tokenizers_bos_once(bos_tokenizer: Any) -> None:
    ex = chat(bos_tokenizer, CHAT[1:3])
    bos = bos_tokenizer.bos_token_id
    assert ex.input_ids[0] == bos
    assert ex.input_ids.count(bos) == 1  # later turns are not given a <s> of their own
    assert ex.labels[0] == IGNORE_INDEX


def test_a_template_that_renders_bos_does_not_get_a_second_one(bos_tokenizer: Any) -> None:
    template = "{{ bos_token }}" + TEMPLATE
    messages = CHAT[1:3]
    [ex] = encode_chat(
        [{"messages": messages}], bos_tokenizer, chat_template=template, max_seq_length=512
    )
    expected = bos_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True)
    if not isinstance(expected, list):  # a BatchEncoding in recent transformers
        expected = expected["input_ids"]
    assert ex.input_ids[:-1] == list(expected)
    assert ex.input_ids.count(bos_tokenizer.bos_token_id) == 1


# --- chat templates are rendered in worker processes (tuneserve.data.chat_template)


def test_a_template_that_fails_on_a_row_names_that_row(tokenizer: Any) -> None:
    template = "{% if messages[-1]['content'] == 'No!' %}{{ raise_exception('no') }}{% endif %}"
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT[1:3]}, {"messages": CHAT[1:]}]
    with pytest.raises(InvalidArgument, match=r"does not render: no \(dataset row 2\)") as info:
        encode_chat(rows, tokenizer, chat_template=template + TEMPLATE, max_seq_length=512)
    assert (info.value.field, info.value.row) == ("chat_template", 2)


def test_a_looping_template_is_stopped_by_should_stop(tokenizer: Any) -> None:
    looping = "{% for i in range(90000) %}{% for j in range(90000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(RenderCancelled):
        encode_chat(
            [{"messages": CHAT}],
            tokenizer,
            chat_template=looping,
            max_seq_length=512,
            should_stop=lambda: time.monotonic() > started + 0.1,
        )
    # RenderCancelled, not InvalidArgument: stopped before the first render's 2 s bound; the
    # wall-clock bound leaves a busy machine room (should_stop is asked every 0.1 s).
    assert time.monotonic() - started < 1.5
