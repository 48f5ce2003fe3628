"""Persisted jobs. `JobStore` is the small interface the rest of the service uses; SQLite is
the embedded default. A shared backend (PostgreSQL with SELECT ... FOR UPDATE SKIP LOCKED)
slots in behind the same interface."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from tuneserve.jobs.model import Job, JobFailure, JobSpec, JobState, Progress


@dataclasses.dataclass(frozen=True)
class LossPoint:
    step: int
    epoch: float
    loss: float
    eval_loss: float | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    state       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    progress    TEXT NOT NULL,
    error       TEXT,
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    request_id  TEXT,
    samples     TEXT
);
CREATE TABLE IF NOT EXISTS loss_curve (
    job_id    TEXT NOT NULL,
    step      INTEGER NOT NULL,
    epoch     REAL NOT NULL,
    loss      REAL NOT NULL,
    eval_loss REAL,
    PRIMARY KEY (job_id, step)
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request_id ON jobs(request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
"""


class JobStore(Protocol):
    """Thread-safe: every method may be called from any thread."""

    def insert(self, job: Job) -> None: ...

    def update(self, job: Job) -> None: ...

    def get(self, job_id: str) -> Job | None: ...

    def find_by_request_id(self, request_id: str) -> Job | None: ...

    def list(self, *, state: JobState | None, offset: int, limit: int) -> list[Job]: ...

    def in_states(self, *states: JobState) -> builtins.list[Job]:
        """Jobs in any of the states, oldest first."""
        ...

    def add_loss_points(self, job_id: str, points: builtins.list[LossPoint]) -> None:
        """Append points; a point for a step already stored replaces it (a resumed run)."""
        ...

    def loss_curve(self, job_id: str) -> builtins.list[LossPoint]: ...

    def count_by_state(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class SQLiteJobStore:
    """One connection guarded by a lock: the service writes a handful of rows a second."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Under the lock; SQLite's "database or disk is full" comes out as the OSError
        (ENOSPC) it is, so callers report a full disk rather than an internal error."""
        with self._lock:
            try:
                yield
            except sqlite3.OperationalError as e:
                if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    raise OSError(errno.ENOSPC, f"the job store's disk is full ({e})") from e
                raise

    def insert(self, job: Job) -> None:
        with self._writing():
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            self._db.execute(
                "INSERT INTO jobs (id, seq, state, spec, progress, error, created_at, started_at,"
                " finished_at, attempts, samples, request_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, seq, *self._columns(job), job.spec.request_id),
            )

    def update(self, job: Job) -> None:
        with self._writing():
            self._db.execute(
                "UPDATE jobs SET state=?, spec=?, progress=?, error=?, created_at=?, started_at=?,"
                " finished_at=?, attempts=?, samples=? WHERE id=?",
                (*self._columns(job), job.id),
            )

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id=?", (job_id,))

    def find_by_request_id(self, request_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE request_id=?", (request_id,))

    def list(self, *, state: JobState | None, offset: int, limit: int) -> list[Job]:
        where, args = ("WHERE state=?", [state.value]) if state else ("", [])
        return self._many(
            f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )

    def in_states(self, *states: JobState) -> builtins.list[Job]:
        marks = ",".join("?" * len(states))
        return self._many(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq",
            tuple(s.value for s in states),
        )

    def add_loss_points(self, job_id: str, points: builtins.list[LossPoint]) -> None:
        with self._writing():
            self._db.executemany(
                "INSERT OR REPLACE INTO loss_curve (job_id, step, epoch, loss, eval_loss)"
                " VALUES (?, ?, ?, ?, ?)",
                [(job_id, p.step, p.epoch, p.loss, p.eval_loss) for p in points],
            )

    def loss_curve(self, job_id: str) -> builtins.list[LossPoint]:
        with self._lock:
            rows = self._db.execute(
                "SELECT step, epoch, loss, eval_loss FROM loss_curve WHERE job_id=? ORDER BY step",
                (job_id,),
            ).fetchall()
        return [LossPoint(*r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {str(state): int(n) for state, n in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _columns(job: Job) -> tuple[object, ...]:
        return (
            job.state.value,
            json.dumps(job.spec.to_dict()),
            json.dumps(dataclasses.asdict(job.progress)),
            json.dumps(dataclasses.asdict(job.error)) if job.error else None,
            job.created_at,
            job.started_at,
            job.finished_at,
            job.attempts,
            json.dumps(job.samples),
        )

    def _one(self, sql: str, args: tuple[object, ...]) -> Job | None:
        rows = self._many(sql, args)
        return rows[0] if rows else None

    def _many(
        self, sql: str, args: tuple[object, ...] | builtins.list[object]
    ) -> builtins.list[Job]:
        with self._lock:
            cur = self._db.execute(sql, args)
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        return [self._job(r) for r in rows]

    @staticmethod
    def _job(r: dict[str, object]) -> Job:
        error = json.loads(str(r["error"])) if r["error"] else None
        return Job(
            id=str(r["id"]),
            spec=JobSpec.from_dict(json.loads(str(r["spec"]))),
            state=JobState(r["state"]),
            progress=Progress(**json.loads(str(r["progress"]))),
            created_at=float(r["created_at"]),  # type: ignore[arg-type]
            started_at=r["started_at"],  # type: ignore[arg-type]
            finished_at=r["finished_at"],  # type: ignore[arg-type]
            error=JobFailure(**error) if error else None,
            attempts=int(r["attempts"]),  # type: ignore[call-overload]
            samples=json.loads(str(r["samples"])) if r.get("samples") else [],
        )
