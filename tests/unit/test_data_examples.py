"""tuneserve.data.examples: tokenisation, loss masking and per-batch padding."""

from __future__ import annotations

from typing import Any

import pytest

from tuneserve.data.examples import IGNORE_INDEX, Example, collate, encode_rows
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
