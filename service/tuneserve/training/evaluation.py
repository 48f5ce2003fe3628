"""Evaluation during training: loss on held-out rows (the same masking as training, pad
excluded), and greedy generations on held-out prompts kept with the job."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from tuneserve.data.examples import IGNORE_INDEX, Example, collate
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
