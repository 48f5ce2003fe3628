"""A progress callback for TuneserveClient.wait_for_job that prints plain lines (no tqdm)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from tuneserve_client.v1 import tuneserve_pb2 as pb

STATE_NAMES = {v: k.removeprefix("JOB_STATE_") for k, v in pb.JobState.items()}


def progress_printer(file: TextIO | None = None) -> Callable[[pb.Job], None]:
    """A callback that prints one line each time the job's state or step changes:

    job 3f2a.. RUNNING step 12/120 (10%) epoch 0.30 loss 2.4512 eta 9s
    """
    last: tuple[int, int] | None = None

    def show(job: pb.Job) -> None:
        nonlocal last
        p = job.progress
        if last == (job.state, p.step):
            return
        last = (job.state, p.step)
        line = f"job {job.id} {STATE_NAMES.get(job.state, str(job.state))}"
        if job.state == pb.JOB_STATE_QUEUED:
            line += f" queue position {p.queue_position}"
        elif p.total_steps:
            line += f" step {p.step}/{p.total_steps} ({100 * p.fraction_done:.0f}%)"
            if p.step:
                line += f" epoch {p.epoch:.2f} loss {p.loss:.4f}"
            if p.eval_loss:
                line += f" eval loss {p.eval_loss:.4f}"
            if job.state == pb.JOB_STATE_RUNNING and p.eta_seconds:
                line += f" eta {p.eta_seconds:.0f}s"
        if job.state == pb.JOB_STATE_FAILED and job.error.code:
            line += f" {job.error.code}: {job.error.message}"
        print(line, file=file or sys.stderr, flush=True)

    return show
