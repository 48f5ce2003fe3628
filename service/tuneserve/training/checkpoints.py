"""Resumable checkpoints: the adapter weights, optimizer, scheduler, RNG and progress.

Each is written to a temporary directory and renamed to `step-NNNNNNNN`, so a process killed
mid-write leaves the previous checkpoint intact; the newest `keep` are kept."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from tuneserve import failpoints
from tuneserve.vocabulary import Progress

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "adapter_model.safetensors"


def save_checkpoint(
    directory: Path,
    *,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: Progress,
    keep: int = 2,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{progress.step:08d}"
    tmp = directory / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    # The LoRA weights alone, which is all a resume reads: save_pretrained would also
    # render a model card and write the config each time (half of a checkpoint's 55 ms for
    # the benchmark's model, and a job writes ten).
    tmp.mkdir(parents=True)
    save_file(get_peft_model_state_dict(model), str(tmp / WEIGHTS_FILE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": dataclasses.asdict(progress),
            "torch_rng": torch.get_rng_state(),
        },
        tmp / STATE_FILE,
    )
    failpoints.hit("checkpoint.write")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path | None) -> Path | None:
    if directory is None or not directory.is_dir():
        return None
    complete = [p for p in sorted(directory.glob("step-*")) if (p / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def load_checkpoint(
    path: Path, *, model: PeftModel, optimizer: torch.optim.Optimizer, scheduler: Any
) -> Progress:
    """Restore everything into the given objects; return the progress at that step."""
    weights = load_file(str(path / WEIGHTS_FILE))
    set_peft_model_state_dict(model, weights)
    state = torch.load(path / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(**state["progress"])
