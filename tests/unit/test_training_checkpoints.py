"""tuneserve.training.checkpoints: save, find and restore a run with a tiny GPT-2 and LoRA."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import get_scheduler

from tuneserve.jobs.model import Progress
from tuneserve.models import load_model
from tuneserve.tiny_models import build_tiny_model
from tuneserve.training.checkpoints import (
    STATE_FILE,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOTAL_STEPS = 10


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "gpt2")


@dataclass
class Run:
    model: PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def step(self, batch: torch.Tensor) -> None:
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lora_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if "lora_" in k}


def new_run(base_dir: Path, seed: int) -> Run:
    torch.manual_seed(seed)  # LoRA A is random: a different seed gives different weights
    base = load_model(str(base_dir), device=torch.device("cpu"), dtype=torch.float32)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"], lora_dropout=0.0)
    model = get_peft_model(base, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=2, num_training_steps=TOTAL_STEPS
    )
    return Run(model, optimizer, scheduler)  # type: ignore[arg-type]


@pytest.fixture()
def batch() -> torch.Tensor:
    return torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def progress_at(step: int) -> Progress:
    return Progress(
        step=step,
        total_steps=TOTAL_STEPS,
        epoch=step / 5,
        total_epochs=2.0,
        loss=1.0 / step,
        trained_tokens=24 * step,
        eval_loss=0.75,
        eval_step=step - 1,
    )


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_load_restores_weights_optimizer_scheduler_rng_and_progress(
    base_dir: Path, batch: torch.Tensor, tmp_path: Path
) -> None:
    run = new_run(base_dir, seed=0)
    for _ in range(3):
        run.step(batch)
    saved_progress = progress_at(3)
    path = save_checkpoint(
        tmp_path,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        progress=saved_progress,
    )
    assert path == tmp_path / "step-00000003"
    weights = run.lora_weights()
    moments = {
        i: {k: v.clone() for k, v in s.items()}
        for i, s in run.optimizer.state_dict()["state"].items()
    }
    lr = run.optimizer.param_groups[0]["lr"]
    random_after_save = torch.rand(4)

    # Perturb everything: more steps move the weights, the moments and the schedule.
    for _ in range(2):
        run.step(batch)
    with torch.no_grad():
        for p in run.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert run.scheduler.last_epoch == 5

    progress = load_checkpoint(
        latest_checkpoint(tmp_path) or pytest.fail("no checkpoint found"),
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
    )
    assert progress == saved_progress
    assert_same_weights(run.lora_weights(), weights)
    restored = run.optimizer.state_dict()["state"]
    assert restored.keys() == moments.keys()
    for i, state in moments.items():
        for key, value in state.items():
            assert torch.equal(restored[i][key], value), (i, key)
    assert run.scheduler.last_epoch == 3
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert torch.equal(torch.rand(4), random_after_save)


def test_resumed_run_continues_exactly_like_the_uninterrupted_one(
    base_dir: Path, batch: torch.Tensor, tmp_path: Path
) -> None:
    run = new_run(base_dir, seed=0)
    for _ in range(3):
        run.step(batch)
    save_checkpoint(
        tmp_path,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        progress=progress_at(3),
    )
    for _ in range(2):
        run.step(batch)

    # A new process: fresh objects, different random LoRA initialisation.
    resumed = new_run(base_dir, seed=123)
    with pytest.raises(AssertionError):
        assert_same_weights(resumed.lora_weights(), run.lora_weights())
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None
    progress = load_checkpoint(
        checkpoint, model=resumed.model, optimizer=resumed.optimizer, scheduler=resumed.scheduler
    )
    for _ in range(progress.step, 5):
        resumed.step(batch)
    assert resumed.scheduler.last_epoch == run.scheduler.last_epoch == 5
    for key, value in run.lora_weights().items():
        torch.testing.assert_close(resumed.lora_weights()[key], value, rtol=1e-5, atol=1e-6)


def test_only_the_newest_checkpoints_are_kept(
    base_dir: Path, batch: torch.Tensor, tmp_path: Path
) -> None:
    run = new_run(base_dir, seed=0)
    for step in range(1, 6):
        run.step(batch)
        save_checkpoint(
            tmp_path,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            progress=progress_at(step),
            keep=2,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"
    assert (tmp_path / "step-00000005" / STATE_FILE).is_file()
    assert (tmp_path / "step-00000005" / "adapter_model.safetensors").is_file()

    save_checkpoint(  # keep=1 prunes down to the one just written
        tmp_path,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        progress=progress_at(6),
        keep=1,
    )
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000006"]


def test_saving_a_step_again_replaces_it(
    base_dir: Path, batch: torch.Tensor, tmp_path: Path
) -> None:
    run = new_run(base_dir, seed=0)
    kw = {"model": run.model, "optimizer": run.optimizer, "scheduler": run.scheduler}
    save_checkpoint(tmp_path, progress=progress_at(2), **kw)
    run.step(batch)
    again = save_checkpoint(tmp_path, progress=Progress(step=2, loss=9.0), **kw)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]
    fresh = new_run(base_dir, seed=1)
    progress = load_checkpoint(
        again, model=fresh.model, optimizer=fresh.optimizer, scheduler=fresh.scheduler
    )
    assert progress.loss == 9.0
    assert_same_weights(fresh.lora_weights(), run.lora_weights())


def test_half_written_checkpoints_are_ignored(
    base_dir: Path, batch: torch.Tensor, tmp_path: Path
) -> None:
    run = new_run(base_dir, seed=0)
    run.step(batch)
    good = save_checkpoint(
        tmp_path,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        progress=progress_at(1),
    )
    # A process killed mid-write leaves its temporary directory behind...
    tmp = tmp_path / ".tmp-step-00000007"
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"partial")
    # ...and a step directory without the trainer state is not a complete checkpoint.
    (tmp_path / "step-00000009").mkdir()
    (tmp_path / "step-00000009" / "adapter_model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == good


def test_no_checkpoint_when_there_is_none(tmp_path: Path) -> None:
    assert latest_checkpoint(None) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None


def test_a_stop_right_after_a_checkpoint_step_writes_that_step_once(
    base_dir: Path, tmp_path: Path
) -> None:
    """Cancelled or shut down just after a checkpoint step, the run stops there without
    writing the same step again (the job worker's key for it exists already: a second write
    failed the job instead of stopping it)."""
    from tuneserve.training.recipe import StopTraining
    from tuneserve.training.runner import LoraTrainer
    from tuneserve.vocabulary import DatasetFormat, JobSpec, LoraSpec, TrainingSpec

    spec = JobSpec(
        base_model=str(base_dir),
        adapter_id="stopped",
        dataset_format=DatasetFormat.TEXT,
        dataset_rows=4,
        lora=LoraSpec(r=4, target_modules=("c_attn",)),
        training=TrainingSpec(max_steps=6, batch_size=2, checkpoint_every_steps=1),
    ).validate()
    steps: list[int] = []
    written: list[str] = []
    trainer = LoraTrainer(base_model=str(base_dir), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(StopTraining):
        trainer(
            spec=spec,
            rows=[{"text": f"row number {i} of the data"} for i in range(4)],
            output_dir=tmp_path / "out",
            on_progress=lambda p: steps.append(p.step),
            should_stop=lambda: len(steps) >= 2,  # asked during step 2, a checkpoint step
            checkpoint_dir=tmp_path / "checkpoints",
            on_checkpoint=lambda path: written.append(path.name),
        )
    assert steps == [1, 2]
    assert written == ["step-00000001", "step-00000002"]
