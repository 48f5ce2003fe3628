"""Evaluation during training: loss on held-out rows (the same masking as training, pad
excluded), and greedy generations on held-out prompts kept with the job."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from tuneserve.data.examples import IGNORE_INDEX, Example, collate, collate_labelled
from tuneserve.data.rows import Row


@torch.no_grad()
def eval_loss(
    model: PeftModel, examples: Sequence[Example], *, pad_id: int, batch_size: int
) -> float:
    """Mean cross-entropy per label token over all examples (not a mean of batch means)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for start in range(0, len(ordered), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(ordered[start : start + batch_size], pad_id).items()
        }
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2),
            labels,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(losses)
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def sample_generations(
    model: PeftModel,
    tokenizer: Tokenizer,
    rows: Sequence[Row],
    *,
    limit: int = 3,
    max_new_tokens: int = 64,
) -> list[dict[str, str]]:
    """Greedy completions of up to `limit` held-out prompts (prompt/response rows only)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    samples = []
    for row in [r for r in rows if "prompt" in r][:limit]:
        ids = tokenizer(row["prompt"], return_tensors="pt")["input_ids"].to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        text = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        samples.append({"prompt": row["prompt"], "reference": row["response"], "generated": text})
    model.train(was_training)
    return samples


@dataclass(frozen=True)
class ClassifierScores:
    loss: float
    accuracy: float
    matthews_correlation: float


@torch.no_grad()
def eval_classifier(
    model: PeftModel, examples: Sequence[Example], *, pad_id: int, batch_size: int
) -> ClassifierScores:
    """Mean loss, accuracy and Matthews correlation (article 3's CoLA metric)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    truth: list[int] = []
    predicted: list[int] = []
    total = 0.0
    for start in range(0, len(examples), batch_size):
        batch = collate_labelled(examples[start : start + batch_size], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits.float()
        labels = batch["labels"].to(device)
        total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        truth += labels.tolist()
        predicted += logits.argmax(dim=-1).tolist()
    model.train(was_training)
    n = max(len(truth), 1)
    accuracy = sum(t == p for t, p in zip(truth, predicted, strict=True)) / n
    return ClassifierScores(total / n, accuracy, matthews_correlation(truth, predicted))


def matthews_correlation(truth: Sequence[int], predicted: Sequence[int]) -> float:
    """The multi-class Matthews correlation coefficient (Gorodkin's R_K); 0 when undefined."""
    classes = sorted(set(truth) | set(predicted))
    s = len(truth)
    correct = sum(t == p for t, p in zip(truth, predicted, strict=True))
    t_k = [truth.count(k) for k in classes]
    p_k = [predicted.count(k) for k in classes]
    numerator = correct * s - sum(t * p for t, p in zip(t_k, p_k, strict=True))
    denominator = math.sqrt(s * s - sum(p * p for p in p_k)) * math.sqrt(
        s * s - sum(t * t for t in t_k)
    )
    return numerator / denominator if denominator else 0.0
