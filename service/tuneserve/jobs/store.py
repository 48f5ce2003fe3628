"""Persisted jobs and the adapter index: the state every replica shares. `JobStore` is the
small interface the rest of the service uses. SQLite (`store_sqlite.py`) is the embedded
default; PostgreSQL (`store_postgres.py`) is the shared one. Both run the same statements
(`store_sql.py`), so a job is claimed, leased and fenced the same way on either.

Claims. Workers never take jobs from one process's memory: `claim` picks the oldest job
that is QUEUED, or RUNNING under a lease that has expired (its worker died), and makes it
RUNNING under the caller with a lease until `now + lease_s` and a new fencing token
(`Job.fence`, bumped on every claim). The worker renews the lease (`heartbeat`) and presents
the token with every write it makes: progress, loss points, checkpoints, the final state,
the adapter's publication. A write with a token that is no longer the job's raises
`LeaseLost`, so a worker that lost its lease (a network partition, a stalled process)
writes nothing more; another replica has resumed the job by then.

Adapters. The index of published adapters lives here too, because an adapter is published
by the same transaction that marks its job SUCCEEDED (`publish`): a job's adapter appears
exactly once, and only after its files were uploaded (the caller uploads before it calls)."""

from __future__ import annotations

import builtins
import dataclasses
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from tuneserve.errors import InvalidArgument
from tuneserve.jobs.model import Job, JobState
from tuneserve.registry import AdapterRecord

__all__ = ["AdapterRecord", "JobStore", "LeaseLost", "LossPoint", "open_job_store", "redact"]


@dataclasses.dataclass(frozen=True)
class LossPoint:
    step: int
    epoch: float
    loss: float
    eval_loss: float | None = None


class LeaseLost(Exception):
    """A worker's write carried a fencing token that is no longer the job's: another claim
    took the job (the lease expired), or the job ended. The worker must stop."""

    def __init__(self, job_id: str, fence: int) -> None:
        super().__init__(f"job {job_id}: the claim with fence {fence} is no longer held")
        self.job_id, self.fence = job_id, fence


class JobStore(Protocol):
    """Thread-safe: every method may be called from any thread. A store that cannot reach
    its database raises tuneserve.errors.Unavailable."""

    url: str  # for logs; never a password

    # --- jobs

    def insert(self, job: Job) -> Job:
        """Insert a QUEUED job and return it; if its request_id (when not empty) already
        names a job, insert nothing and return that job (the first call's, on any replica).
        AlreadyExists if a QUEUED or RUNNING job already trains the same adapter id."""
        ...

    def get(self, job_id: str) -> Job | None: ...

    def find_by_request_id(self, request_id: str) -> Job | None: ...

    def list(self, *, state: JobState | None, offset: int, limit: int) -> list[Job]:
        """Newest first."""
        ...

    def in_states(self, *states: JobState) -> builtins.list[Job]:
        """Jobs in any of the states, oldest first."""
        ...

    def queue_position(self, job_id: str) -> int:
        """QUEUED jobs ahead of this one."""
        ...

    def count_by_state(self) -> dict[str, int]: ...

    # --- claims: the worker's side

    def claim(self, worker: str, lease_s: float) -> Job | None:
        """Take the oldest QUEUED job, or RUNNING one whose lease expired, for `worker`:
        RUNNING, attempts + 1, a new fence, started now, leased for `lease_s`. None when
        there is none. Two callers never get the same claim."""
        ...

    def heartbeat(self, job_id: str, fence: int, lease_s: float) -> bool:
        """Renew the lease for `lease_s` more; return whether a cancel was requested.
        LeaseLost when the claim is no longer held."""
        ...

    def save_progress(self, job: Job) -> None:
        """Write a RUNNING job's progress and samples under its claim (`job.fence`)."""
        ...

    def add_loss_points(self, job_id: str, fence: int, points: builtins.list[LossPoint]) -> None:
        """Append points under the claim; a point for a step already stored replaces it (a
        resumed run writes each step once)."""
        ...

    def save_checkpoint(self, job_id: str, fence: int, key: str) -> str:
        """Record `key` as the job's newest checkpoint under the claim; return the key it
        replaces ("" none), whose artifacts the caller may delete."""
        ...

    def finish(self, job: Job) -> None:
        """End a claimed job: write its final state, error, progress and samples under the
        claim, and drop the lease."""
        ...

    def release(self, job: Job) -> None:
        """Give a claimed job back to the queue (a graceful shutdown): QUEUED again, in its
        old place, this start not counted as an attempt; its checkpoint kept."""
        ...

    def expire_leases(self, worker: str) -> int:
        """Expire every lease `worker` holds: a restarted replica's previous process is
        gone, so its jobs need not wait out their leases. Returns how many."""
        ...

    def ended_with_checkpoints(self) -> builtins.list[str]:
        """Ended jobs whose checkpoints were not deleted yet (their replica died between
        the end and the clean-up)."""
        ...

    def forget_checkpoint(self, job_id: str) -> None:
        """An ended job's checkpoints are deleted: clear its record of them."""
        ...

    # --- any replica

    def cancel(self, job_id: str) -> Job | None:
        """A QUEUED job becomes CANCELLED; a RUNNING one gets a cancel request its worker
        sees at its next heartbeat. Returns the job after, None when there is no such job;
        a job already ended is returned unchanged."""
        ...

    def loss_curve(self, job_id: str) -> builtins.list[LossPoint]: ...

    # --- adapters

    def publish(self, job: Job, record: AdapterRecord) -> AdapterRecord:
        """In one transaction, under the job's claim: index the adapter and mark the job
        SUCCEEDED (with its progress and samples). If the job already published it (a
        retried publish), return that record. AlreadyExists when another adapter holds the
        id; LeaseLost when the claim is gone (nothing written)."""
        ...

    def add_adapter(self, record: AdapterRecord) -> AdapterRecord:
        """Index an adapter that no job made (an import). AlreadyExists if the id is taken."""
        ...

    def get_adapter(self, adapter_id: str) -> AdapterRecord | None: ...

    def list_adapters(self) -> builtins.list[AdapterRecord]:
        """Newest first."""
        ...

    def delete_adapter(self, adapter_id: str) -> AdapterRecord | None:
        """Remove it from the index (every replica stops serving it); the removed record,
        whose files the caller deletes, or None when there was none."""
        ...

    def close(self) -> None: ...


def open_job_store(url: str, *, default_path: Path) -> JobStore:
    """The store a `--job-store` setting names: "" for SQLite at `default_path`,
    "sqlite:///abs/path" for SQLite elsewhere, "postgresql://user@host:port/db?..." for
    PostgreSQL (the password best from libpq's PGPASSWORD or PGPASSFILE; one in the URL is
    accepted and never logged)."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise InvalidArgument(
            f"job_store: not a URL ({e}); give nothing, sqlite:///path or "
            "postgresql://user@host:5432/db",
            field="job_store",
        ) from None
    if not url:
        from tuneserve.jobs.store_sqlite import SQLiteJobStore

        return SQLiteJobStore(default_path)
    if parts.scheme == "sqlite":
        from tuneserve.jobs.store_sqlite import SQLiteJobStore

        if not parts.path.startswith("/"):
            raise InvalidArgument(
                "job_store: a SQLite URL names an absolute path: sqlite:///var/lib/jobs.db",
                field="job_store",
            )
        return SQLiteJobStore(Path(parts.path))
    if parts.scheme in ("postgresql", "postgres"):
        from tuneserve.jobs.store_postgres import PostgresJobStore

        return PostgresJobStore(url)
    raise InvalidArgument(
        f"job_store: {redact(url)!r} is not a job store: give nothing (SQLite in the data "
        "directory), sqlite:///path or postgresql://user@host:5432/db",
        field="job_store",
    )


def redact(url: str) -> str:
    """`url` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    query = [
        (name, "***" if name.lower() == "password" else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    if query:
        parts = parts._replace(query=urlencode(query, safe="*"))
    return parts.geturl()
