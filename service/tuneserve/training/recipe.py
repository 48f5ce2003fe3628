"""The LoRA fine-tuning recipe, top to bottom: data, model, optimizer, resume, train, save.

Given a job spec, its rows, a fresh base model and two hooks (progress, stop), it trains a
LoRA adapter and writes it (PEFT safetensors) to a directory. It knows nothing of gRPC, the
queue, the registry or Prometheus.

Where the seed notebooks waste work, this does not: rows are padded per batch (grouped by
length) rather than to a fixed maximum, pad tokens and (by default) prompts are out of the
loss, every row ends with EOS, and a resumable checkpoint is written every few steps."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, get_scheduler
from transformers import PreTrainedTokenizerBase as Tokenizer

from tuneserve.data.chat_template import RenderCancelled, RendererClosed, TemplateRenderer
from tuneserve.data.examples import (
    IGNORE_INDEX,
    Example,
    collate,
    collate_labelled,
    collate_packed,
    encode_chat,
    encode_labelled,
    encode_rows,
)
from tuneserve.data.rows import Row
from tuneserve.errors import InvalidArgument
from tuneserve.models import max_positions
from tuneserve.training.batching import epoch_batches
from tuneserve.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from tuneserve.training.evaluation import eval_classifier, eval_loss, sample_generations
from tuneserve.training.flops import model_flops_utilisation, peak_flops
from tuneserve.training.lora_dropout import use_cpu_dropout
from tuneserve.vocabulary import DatasetFormat, JobSpec, Progress, Task

DEFAULT_CHECKPOINT_GAP_S = 60.0
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


class StopTraining(Exception):  # a signal, not a failure
    """Raised out of the loop when `should_stop` says so; the job decides what it means."""


@dataclass(frozen=True)
class TrainResult:
    final_loss: float
    steps: int
    epochs: float
    trained_tokens: int
    target_modules: tuple[str, ...]
    eval_loss: float | None = None
    samples: list[dict[str, str]] = field(default_factory=list)


def train_lora(
    *,
    spec: JobSpec,
    rows: Sequence[Row],
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    output_dir: Path,
    on_progress: Callable[[Progress], None],
    should_stop: Callable[[], bool],
    validation_rows: Sequence[Row] = (),
    parent_adapter_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    chat_renderer: TemplateRenderer | None = None,
    on_checkpoint: Callable[[Path], None] = lambda path: None,
) -> TrainResult:
    tr, lora = spec.training, spec.lora
    device = next(model.parameters()).device
    torch.manual_seed(tr.seed)

    # --- Data: tokenise once; batches are padded to their own longest row.
    max_len = min(tr.max_seq_length, max_positions(model))
    classify = spec.task is Task.CLASSIFICATION

    def encode(split: Sequence[Row]) -> list[Example]:
        if not split:
            return []
        if classify:
            return encode_labelled(split, tokenizer, labels=spec.labels, max_seq_length=max_len)
        if spec.dataset_format is DatasetFormat.CHAT:
            try:  # rendered in worker processes; a cancel or shutdown stops it there
                return encode_chat(
                    split,
                    tokenizer,
                    chat_template=spec.chat_template or None,
                    max_seq_length=max_len,
                    mask_prompt=tr.loss_on == "completion",
                    renderer=chat_renderer,
                    should_stop=should_stop,
                )
            except (RenderCancelled, RendererClosed):
                raise StopTraining from None
        return encode_rows(
            split,
            tokenizer,
            dataset_format=spec.dataset_format,
            max_seq_length=max_len,
            mask_prompt=tr.loss_on == "completion",
        )

    examples, eval_examples = encode(rows), encode(validation_rows)
    batch_of: Callable[[Sequence[Example], int], dict[str, torch.Tensor]]
    if classify:
        batch_of = collate_labelled
    elif tr.packing:
        batch_of = partial(collate_packed, capacity=max_len)
    else:
        batch_of = collate
    _check_trainable(examples, spec)
    lengths = [len(e.input_ids) for e in examples]
    micro_per_epoch = math.ceil(len(examples) / tr.batch_size)
    accum = tr.gradient_accumulation_steps
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = tr.max_steps or tr.epochs * steps_per_epoch
    warmup = tr.warmup_steps if tr.warmup_steps is not None else int(0.05 * total_steps)
    eval_every = tr.eval_every_steps or steps_per_epoch
    checkpoint_every = tr.checkpoint_every_steps or max(1, total_steps // 10)
    # The default cadence is also at most one checkpoint a minute: a short job (ten of them
    # in 14 s for the benchmark's fixture) would otherwise spend more on checkpoints than a
    # crash could cost it. A cadence the job asks for is kept to the step.
    min_checkpoint_gap_s = 0.0 if tr.checkpoint_every_steps else DEFAULT_CHECKPOINT_GAP_S

    # --- Model: LoRA on the frozen base, new or continued from a parent adapter.
    if tr.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model: PeftModel
    if parent_adapter_dir is not None:
        peft_model = PeftModel.from_pretrained(model, str(parent_adapter_dir), is_trainable=True)
    else:
        peft_model = get_peft_model(
            model,
            LoraConfig(
                # SEQ_CLS also trains and saves the classification head (modules_to_save).
                task_type="SEQ_CLS" if classify else "CAUSAL_LM",
                r=lora.r,
                lora_alpha=lora.alpha,  # type: ignore[arg-type]  # floats work: scale = alpha / r
                lora_dropout=lora.dropout,
                target_modules=_target_modules(lora.target_modules),
                use_rslora=lora.use_rslora,
                use_dora=lora.use_dora,
            ),
        )
    if device.type == "cpu":
        use_cpu_dropout(peft_model)  # a quarter of a CPU step was torch's dropout
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    parameters = sum(p.numel() for p in peft_model.parameters())
    peak = peak_flops(device)
    optimizer = torch.optim.AdamW(trainable, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    scheduler = get_scheduler(
        _SCHEDULERS[tr.scheduler],
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
    )
    pad_id = tokenizer.pad_token_id
    assert pad_id is not None

    # --- Resume: a checkpoint of this job, if the process stopped mid-run.
    progress = Progress(total_steps=total_steps, total_epochs=total_steps / steps_per_epoch)
    if (checkpoint := latest_checkpoint(checkpoint_dir)) is not None:
        progress = load_checkpoint(
            checkpoint, model=peft_model, optimizer=optimizer, scheduler=scheduler
        )
        progress.resumed_from_step = progress.step

    def micro_batch(index: int, plans: dict[int, list[list[int]]]) -> list[Example]:
        epoch, position = divmod(index, micro_per_epoch)
        if epoch not in plans:
            plans.clear()
            plans[epoch] = epoch_batches(
                lengths,
                batch_size=tr.batch_size,
                seed=tr.seed,
                epoch=epoch,
                group_by_length=tr.group_by_length,
            )
        return [examples[i] for i in plans[epoch][position]]

    saved_step = progress.step  # the step the newest checkpoint holds
    saved_at = time.monotonic()

    def write_checkpoint() -> None:
        nonlocal saved_step, saved_at
        if checkpoint_dir is not None and progress.step != saved_step:
            saved_step, saved_at = progress.step, time.monotonic()
            written = save_checkpoint(
                checkpoint_dir,
                model=peft_model,
                optimizer=optimizer,
                scheduler=scheduler,
                progress=progress,
            )
            on_checkpoint(written)  # the job worker keeps it where other replicas see it

    def stop() -> None:
        write_checkpoint()  # resume here, not at the last save (unless that is this step)
        raise StopTraining

    # --- Train.
    peft_model.train()
    plans: dict[int, list[list[int]]] = {}
    started, tokens_at_start = time.monotonic(), progress.trained_tokens
    while progress.step < total_steps:
        if should_stop():
            stop()
        step = progress.step
        # Micro-batches of an epoch's tail are fewer than `accum`: the last step is short.
        first = _first_micro(step, accum, micro_per_epoch, steps_per_epoch)
        count = _micros_in_step(step, accum, micro_per_epoch, steps_per_epoch)
        step_tokens, step_loss = 0, 0.0
        micro = [micro_batch(index, plans) for index in range(first, first + count)]
        batches = [batch_of(rows_of_batch, pad_id) for rows_of_batch in micro]
        # Each micro-batch's mean loss weighs by the targets it holds, out of the whole
        # step's: the step's loss is the mean over every target in it, as one large batch's
        # would be (and as HF Trainer weighs it), not a mean of micro-batch means, in which
        # a short micro-batch of length-grouped rows counted as much as a long one.
        counts = [loss_targets(batch, classify) for batch in batches]
        step_targets = sum(counts)
        for rows_of_batch, batch, n in zip(micro, batches, counts, strict=True):
            if n == 0:  # nothing to learn from (every label masked): no forward at all
                continue
            on_device = {k: v.to(device) for k, v in batch.items()}
            # No KV cache: training never reads one, and with one transformers would not
            # confine a packed row's attention to each example (it looks for restarting
            # position ids only when there is no cache).
            loss = peft_model(**on_device, use_cache=False).loss * (n / step_targets)
            loss.backward()
            step_loss += float(loss.detach())
            step_tokens += sum(len(e.input_ids) for e in rows_of_batch)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.monotonic() - started
        progress.step = step + 1
        progress.epoch = progress.step / steps_per_epoch
        progress.loss = step_loss
        progress.trained_tokens += step_tokens
        progress.tokens_per_second = (progress.trained_tokens - tokens_at_start) / max(
            elapsed, 1e-9
        )
        progress.mfu = model_flops_utilisation(
            parameters=parameters, tokens_per_second=progress.tokens_per_second, peak=peak
        )
        done_here = progress.step - progress.resumed_from_step
        progress.eta_seconds = elapsed / done_here * (total_steps - progress.step)
        if eval_examples and (progress.step % eval_every == 0 or progress.step == total_steps):
            if classify:
                scores = eval_classifier(
                    peft_model, eval_examples, pad_id=pad_id, batch_size=tr.batch_size
                )
                progress.eval_loss = scores.loss
                progress.eval_accuracy = scores.accuracy
                progress.eval_matthews_correlation = scores.matthews_correlation
            else:
                progress.eval_loss = eval_loss(
                    peft_model, eval_examples, pad_id=pad_id, batch_size=tr.batch_size
                )
            progress.eval_step = progress.step
        on_progress(progress)  # before the checkpoint: a resumed run never skips a report
        due = progress.step % checkpoint_every == 0 and progress.step < total_steps
        if due and time.monotonic() - saved_at >= min_checkpoint_gap_s:
            write_checkpoint()

    # --- Save: PEFT safetensors, the adapter only; samples on held-out prompts.
    peft_model.save_pretrained(str(output_dir), safe_serialization=True)
    held_out_prompts = bool(validation_rows) and not classify
    samples = sample_generations(peft_model, tokenizer, validation_rows) if held_out_prompts else []
    targets = getattr(peft_model.peft_config["default"], "target_modules", ())
    return TrainResult(
        final_loss=progress.loss,
        steps=progress.step,
        epochs=progress.step / steps_per_epoch,
        trained_tokens=progress.trained_tokens,
        target_modules=tuple(sorted(targets)) if not isinstance(targets, str) else (targets,),
        eval_loss=progress.eval_loss if eval_examples else None,
        samples=samples,
    )


def _target_modules(names: tuple[str, ...]) -> list[str] | str | None:
    """Empty: every linear layer but the head. ("default",): peft's choice for the
    architecture (GPT-2: c_attn; Llama: q_proj, v_proj). Otherwise the names given."""
    if not names:
        return "all-linear"
    if names == ("default",):
        return None
    return list(names)


def _first_micro(step: int, accum: int, micro_per_epoch: int, steps_per_epoch: int) -> int:
    """Index of the step's first micro-batch: steps never straddle an epoch boundary."""
    epoch, within = divmod(step, steps_per_epoch)
    return epoch * micro_per_epoch + within * accum


def _micros_in_step(step: int, accum: int, micro_per_epoch: int, steps_per_epoch: int) -> int:
    within = step % steps_per_epoch
    return min(accum, micro_per_epoch - within * accum)


def _check_trainable(examples: Sequence[Example], spec: JobSpec) -> None:
    for index, example in enumerate(examples):
        if example.trained_tokens == 0:
            raise InvalidArgument(
                f"dataset row {index}: no response tokens fit in max_seq_length="
                f"{spec.training.max_seq_length}; shorten the prompt or raise the limit",
                field="training.max_seq_length",
                row=index,
            )


def loss_targets(batch: dict[str, torch.Tensor], classify: bool) -> int:
    """The targets a micro-batch's mean loss is taken over: one per row for a classifier;
    for a causal LM, the positions whose next token carries a label (the model shifts the
    labels by one)."""
    labels = batch["labels"]
    if classify:
        return int(labels.numel())
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
