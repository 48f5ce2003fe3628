"""The job worker's trainer: loads a fresh copy of the base model for each job, so training
never touches the weights the inference engine is serving from.

Sharing policy: the trainer holds its own copy of the base model while a job runs and frees
it after. That doubles base-model memory during training but keeps inference answering
without locks between the two; the device is time-sliced between them by coserving.py,
which also says what holding the base weights once would cost."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tuneserve.data.chat_template import TemplateRenderer
from tuneserve.data.rows import Row
from tuneserve.models import load_classifier, load_model, load_tokenizer
from tuneserve.training.recipe import TrainResult, train_lora
from tuneserve.vocabulary import JobSpec, Progress, Task


class LoraTrainer:
    def __init__(
        self,
        *,
        base_model: str,
        device: torch.device,
        dtype: torch.dtype,
        chat_renderer: TemplateRenderer | None = None,
    ) -> None:
        self.base_model = base_model
        self.chat_renderer = chat_renderer  # None: the process's shared one
        self.device = device
        # LoRA weights train in float32 (peft upcasts them); the frozen base may be half.
        self.dtype = dtype

    def __call__(
        self,
        *,
        spec: JobSpec,
        rows: Sequence[Row],
        output_dir: Path,
        on_progress: Callable[[Progress], None],
        should_stop: Callable[[], bool],
        validation_rows: Sequence[Row] = (),
        parent_adapter_dir: Path | None = None,
        checkpoint_dir: Path | None = None,
        on_checkpoint: Callable[[Path], None] = lambda path: None,
    ) -> TrainResult:
        tokenizer = load_tokenizer(self.base_model)
        if spec.task is Task.CLASSIFICATION:
            assert tokenizer.pad_token_id is not None
            model = load_classifier(
                self.base_model,
                labels=spec.labels,
                pad_token_id=tokenizer.pad_token_id,
                device=self.device,
                dtype=self.dtype,
            )
        else:
            model = load_model(self.base_model, device=self.device, dtype=self.dtype)
        try:
            return train_lora(
                spec=spec,
                rows=rows,
                model=model,
                tokenizer=tokenizer,
                output_dir=output_dir,
                on_progress=on_progress,
                should_stop=should_stop,
                validation_rows=validation_rows,
                parent_adapter_dir=parent_adapter_dir,
                checkpoint_dir=checkpoint_dir,
                chat_renderer=self.chat_renderer,
                on_checkpoint=on_checkpoint,
            )
        finally:
            del model
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
