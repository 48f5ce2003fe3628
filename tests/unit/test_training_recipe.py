"""tuneserve.training.recipe on a tiny GPT-2: how a step's loss is weighed across
gradient-accumulation micro-batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuneserve.tiny_models import build_tiny_model
from tuneserve.training.runner import LoraTrainer
from tuneserve.vocabulary import DatasetFormat, JobSpec, LoraSpec, Progress, TrainingSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Eight rows of very different lengths: sorted by length, the two micro-batches of a step
# hold 4 short rows and 4 long ones.
ROWS = [{"text": "short row"} for _ in range(4)] + [
    {"text": " ".join(f"word{i}" for i in range(40 + 5 * r))} for r in range(4)
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "gpt2")


def first_step_loss(base_dir: Path, tmp: Path, *, batch_size: int, accumulation: int) -> float:
    spec = JobSpec(
        base_model=str(base_dir),
        adapter_id="weights",
        dataset_format=DatasetFormat.TEXT,
        dataset_rows=len(ROWS),
        lora=LoraSpec(r=4, dropout=0.0, target_modules=("c_attn",)),
        training=TrainingSpec(
            max_steps=1,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_seq_length=128,
        ),
    ).validate()
    reports: list[Progress] = []
    LoraTrainer(base_model=str(base_dir), device=torch.device("cpu"), dtype=torch.float32)(
        spec=spec,
        rows=ROWS,
        output_dir=tmp,
        on_progress=reports.append,
        should_stop=lambda: False,
    )
    return reports[0].loss


def test_a_steps_loss_weighs_each_micro_batch_by_the_targets_it_holds(
    base_dir: Path, tmp_path: Path
) -> None:
    """One step over all eight rows, as one batch of 8 or as 2 accumulated micro-batches of
    4 grouped by length: the same rows, the same loss (LoRA's B starts at zero, so both
    steps see the base model). A mean of the two micro-batch means would weigh the 4 short
    rows' few targets as much as the long rows' many."""
    whole = first_step_loss(base_dir, tmp_path / "whole", batch_size=8, accumulation=1)
    accumulated = first_step_loss(base_dir, tmp_path / "accum", batch_size=4, accumulation=2)
    assert accumulated == pytest.approx(whole, rel=1e-5)


def test_accumulated_steps_run_through_several_epochs(base_dir: Path, tmp_path: Path) -> None:
    """Eight rows, 2 rows a micro-batch, 2 micro-batches a step: 2 steps an epoch, 5 steps
    run across 3 epochs, every step reported once with a finite loss."""
    spec = JobSpec(
        base_model=str(base_dir),
        adapter_id="epochs",
        dataset_format=DatasetFormat.TEXT,
        dataset_rows=len(ROWS),
        lora=LoraSpec(r=4, dropout=0.0, target_modules=("c_attn",)),
        training=TrainingSpec(
            max_steps=5, batch_size=2, gradient_accumulation_steps=2, max_seq_length=64
        ),
    ).validate()
    reports: list[Progress] = []
    result = LoraTrainer(base_model=str(base_dir), device=torch.device("cpu"), dtype=torch.float32)(
        spec=spec,
        rows=ROWS,
        output_dir=tmp_path,
        on_progress=lambda p: reports.append(Progress(**vars(p))),
        should_stop=lambda: False,
    )
    assert [p.step for p in reports] == [1, 2, 3, 4, 5]
    assert reports[-1].epoch == pytest.approx(2.5)
    assert all(0 < p.loss < 100 for p in reports)
    assert result.steps == 5
