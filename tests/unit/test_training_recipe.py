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


# Prompt/response rows of very different lengths (prompts out of the loss), so that packed
# rows hold several examples and example boundaries fall everywhere.
PAIRS = [
    {
        "prompt": f"Question {i}: " + " ".join(f"q{j}" for j in range(1 + (7 * i) % 9)),
        "response": " " + " ".join(f"a{j}" for j in range(2 + (5 * i) % 23)),
    }
    for i in range(12)
]


def run_losses(
    base_dir: Path, tmp: Path, *, packing: bool, loss_on: str = "completion"
) -> tuple[list[float], float]:
    """Every step's loss and the final held-out loss of a 3-epoch run on PAIRS."""
    spec = JobSpec(
        base_model=str(base_dir),
        adapter_id="packing",
        dataset_format=DatasetFormat.PROMPT_RESPONSE,
        dataset_rows=len(PAIRS),
        validation_rows=4,
        lora=LoraSpec(r=4, dropout=0.0),
        training=TrainingSpec(
            epochs=3,
            batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=5e-3,
            max_seq_length=160,
            packing=packing,
            loss_on=loss_on,
        ),
    ).validate()
    losses: list[float] = []  # the trainer reports one Progress object, updated in place
    result = LoraTrainer(base_model=str(base_dir), device=torch.device("cpu"), dtype=torch.float32)(
        spec=spec,
        rows=PAIRS,
        validation_rows=PAIRS[:4],
        output_dir=tmp,
        on_progress=lambda progress: losses.append(progress.loss),
        should_stop=lambda: False,
    )
    assert result.eval_loss is not None
    return losses, result.eval_loss


@pytest.mark.parametrize(("architecture", "loss_on"), [("gpt2", "all"), ("llama", "completion")])
def test_a_packed_run_trains_as_the_padded_run_on_the_same_rows(
    tmp_path: Path, architecture: str, loss_on: str
) -> None:
    """Packing lays each micro-batch's rows end to end (position ids restarting, attention
    confined to each row, the first label of each row out of the loss): every step's loss,
    and so every update, is the padded run's within float32 rounding (relative 1e-4), for
    absolute positions (GPT-2) and rotary ones (Llama), with the loss on every token (where
    a row's first token is a label) or on responses only. Attention leaking across rows, or
    a row's first token counted as a target of the row before, moves them by far more."""
    base = build_tiny_model(tmp_path / architecture, architecture=architecture)
    padded, padded_eval = run_losses(base, tmp_path / "padded", packing=False, loss_on=loss_on)
    packed, packed_eval = run_losses(base, tmp_path / "packed", packing=True, loss_on=loss_on)
    assert len(padded) == len(packed) == 6
    assert packed == pytest.approx(padded, rel=1e-4)
    assert packed_eval == pytest.approx(padded_eval, rel=1e-4)
    assert padded[-1] < padded[0]  # it learnt something: the equality is not of two no-ops


@pytest.mark.parametrize(("every", "expected"), [(0, []), (3, ["step-00000003", "step-00000006"])])
def test_the_default_checkpoint_cadence_writes_at_most_one_a_minute(
    base_dir: Path, tmp_path: Path, every: int, expected: list[str]
) -> None:
    """Eight steps in a few seconds: about every 10% of the run would be every step, but the
    default writes none before a minute has passed; a cadence the job asks for is kept."""
    spec = JobSpec(
        base_model=str(base_dir),
        adapter_id="cadence",
        dataset_format=DatasetFormat.TEXT,
        dataset_rows=len(ROWS),
        lora=LoraSpec(r=4, dropout=0.0, target_modules=("c_attn",)),
        training=TrainingSpec(
            max_steps=8, batch_size=1, max_seq_length=64, checkpoint_every_steps=every
        ),
    ).validate()
    written: list[str] = []
    LoraTrainer(base_model=str(base_dir), device=torch.device("cpu"), dtype=torch.float32)(
        spec=spec,
        rows=ROWS,
        output_dir=tmp_path / "out",
        on_progress=lambda progress: None,
        should_stop=lambda: False,
        checkpoint_dir=tmp_path / "checkpoints",
        on_checkpoint=lambda path: written.append(path.name),
    )
    assert written == expected
