"""The LoRA fine-tuning recipe, top to bottom: set up, train, save.

Given a job spec, its rows, a fresh base model and two hooks (progress, stop), it trains a
LoRA adapter and writes it (PEFT safetensors) to a directory. It knows nothing of gRPC, the
queue, the registry or Prometheus."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel, get_linear_schedule_with_warmup
from transformers import PreTrainedTokenizerBase as Tokenizer

from tuneserve.data.examples import Example, collate, encode_rows
from tuneserve.data.rows import Row
from tuneserve.errors import InvalidArgument
from tuneserve.jobs.model import JobSpec, Progress
from tuneserve.models import max_positions


class StopTraining(Exception):
    """Raised out of the loop when `should_stop` says so; the job decides what it means."""


@dataclass(frozen=True)
class TrainResult:
    final_loss: float
    steps: int
    epochs: float
    trained_tokens: int
    target_modules: tuple[str, ...]


def train_lora(
    *,
    spec: JobSpec,
    rows: Sequence[Row],
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    output_dir: Path,
    on_progress: Callable[[Progress], None],
    should_stop: Callable[[], bool],
) -> TrainResult:
    tr, lora = spec.training, spec.lora
    device = next(model.parameters()).device
    rng = random.Random(tr.seed)
    torch.manual_seed(tr.seed)

    # --- Data: tokenise once; padding happens per batch.
    max_len = min(tr.max_seq_length, max_positions(model))
    examples = encode_rows(
        rows, tokenizer, dataset_format=spec.dataset_format, max_seq_length=max_len
    )
    _check_trainable(examples, spec)
    batches_per_epoch = math.ceil(len(examples) / tr.batch_size)
    total_steps = tr.max_steps or tr.epochs * batches_per_epoch
    total_epochs = total_steps / batches_per_epoch
    warmup = tr.warmup_steps if tr.warmup_steps is not None else int(0.05 * total_steps)

    # --- Model: LoRA on the frozen base.
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r; floats work
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) or "all-linear",
    )
    peft_model = get_peft_model(model, peft_config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tr.learning_rate, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    pad_id = tokenizer.pad_token_id
    assert pad_id is not None

    # --- Train.
    peft_model.train()
    progress = Progress(total_steps=total_steps, total_epochs=total_epochs)
    started = time.monotonic()
    step = 0
    loss_value = float("nan")
    while step < total_steps:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), tr.batch_size):
            if step >= total_steps:
                break
            if should_stop():
                raise StopTraining
            batch_examples = [examples[i] for i in order[start : start + tr.batch_size]]
            batch = {k: v.to(device) for k, v in collate(batch_examples, pad_id).items()}
            loss = peft_model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            loss_value = float(loss.detach())
            elapsed = time.monotonic() - started
            progress.step = step
            progress.epoch = step / batches_per_epoch
            progress.loss = loss_value
            progress.trained_tokens += sum(len(e.input_ids) for e in batch_examples)
            progress.tokens_per_second = progress.trained_tokens / max(elapsed, 1e-9)
            progress.eta_seconds = elapsed / step * (total_steps - step)
            on_progress(progress)

    # --- Save: PEFT safetensors, the adapter only.
    peft_model.save_pretrained(str(output_dir), safe_serialization=True)
    targets = getattr(peft_model.peft_config["default"], "target_modules", ())
    return TrainResult(
        final_loss=loss_value,
        steps=step,
        epochs=total_epochs,
        trained_tokens=progress.trained_tokens,
        target_modules=tuple(sorted(targets)) if not isinstance(targets, str) else (targets,),
    )


def _check_trainable(examples: Sequence[Example], spec: JobSpec) -> None:
    for index, example in enumerate(examples):
        if example.trained_tokens == 0:
            raise InvalidArgument(
                f"dataset row {index}: no response tokens fit in max_seq_length="
                f"{spec.training.max_seq_length}; shorten the prompt or raise the limit",
                field="training.max_seq_length",
                row=index,
            )
