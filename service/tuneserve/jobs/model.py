"""A job as the queue keeps it: its spec (tuneserve.vocabulary.JobSpec), its state, its
claim and its progress. Plain dataclasses, serialised to JSON for the store; no grpc, no
torch."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tuneserve.vocabulary import (
    ADAPTER_ID_RE,
    MAX_LORA_ALPHA,
    MAX_SEED,
    SCHEDULERS,
    DatasetFormat,
    JobSpec,
    LoraSpec,
    Progress,
    Task,
    TrainingSpec,
    check_adapter_id,
)

# The vocabulary's words, named here too for the job code and its tests.
__all__ = [
    "ADAPTER_ID_RE",
    "MAX_LORA_ALPHA",
    "MAX_SEED",
    "SCHEDULERS",
    "DatasetFormat",
    "Job",
    "JobFailure",
    "JobSpec",
    "JobState",
    "LoraSpec",
    "Progress",
    "Task",
    "TrainingSpec",
    "check_adapter_id",
]


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True, kw_only=True)
class JobFailure:
    code: str
    message: str
    field: str = ""
    row: int | None = None


@dataclass(kw_only=True)
class Job:
    id: str
    spec: JobSpec
    state: JobState = JobState.QUEUED
    progress: Progress = field(default_factory=Progress)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: JobFailure | None = None
    attempts: int = 0
    # Greedy generations on held-out prompts: dicts of prompt, reference, generated.
    samples: list[dict[str, str]] = field(default_factory=list)
    # Filled in when read, not stored: jobs ahead of this one in the queue.
    queue_position: int = 0
    # The claim's fencing token: bumped by every claim, presented by every write the worker
    # holding it makes, so a worker that lost its lease can write nothing more.
    fence: int = 0
    # The artifact key of the newest checkpoint this job's workers committed ("" none).
    checkpoint: str = ""
    # CancelJob reached a replica while another one ran the job: its worker stops.
    cancel_requested: bool = False
