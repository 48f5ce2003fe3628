"""The job store's statements, shared by SQLite and PostgreSQL: one claim, lease and fence
code path for both (see store.py for the semantics). A backend supplies a transaction
(`_transaction`), its schema (`_migrate`) and the few words its dialect spells differently.

Statements are written with `?` placeholders; a backend whose driver wants `%s` sets
`_paramstyle`. Times are the replicas' clocks (time.time()): leases are tens of seconds,
clocks of cluster nodes agree to well under one."""

from __future__ import annotations

import abc
import builtins
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tuneserve.errors import AlreadyExists
from tuneserve.jobs.model import Job, JobFailure, JobSpec, JobState, Progress
from tuneserve.jobs.store import AdapterRecord, LeaseLost, LossPoint

ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)

JOB_COLUMNS = (
    "id, state, spec, progress, error, created_at, started_at, finished_at, attempts, "
    "samples, fence, checkpoint, cancel_requested"
)
ADAPTER_COLUMNS = "id, version, key, info, source_job_id, created_at"


class UniqueViolation(Exception):
    """A backend's unique-constraint error, raised by its `_transaction`."""


class Tx:
    """One transaction: `execute` runs a statement and returns its rows (none for writes);
    `rowcount` is the last statement's."""

    def __init__(self, cursor: Any, paramstyle: str) -> None:
        self._cursor = cursor
        self._qmark = paramstyle == "qmark"
        self.rowcount = 0

    def execute(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        if not self._qmark:
            sql = sql.replace("?", "%s")
        self._cursor.execute(sql, tuple(args))
        self.rowcount = self._cursor.rowcount
        return list(self._cursor.fetchall()) if self._cursor.description else []


class SqlJobStore(abc.ABC):
    url: str
    _paramstyle = "qmark"
    # How a claim locks the row it picks: PostgreSQL skips rows another claim has locked
    # (FOR UPDATE SKIP LOCKED); SQLite has one writer at a time, so no clause is needed.
    _claim_lock = ""
    _row_lock = ""  # FOR UPDATE: a fenced check holds the job's row to its commit
    _next_seq = "(SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs)"

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A DB-API cursor inside one transaction that commits when the block ends (rolls
        back on an exception). Unique violations come out as UniqueViolation."""

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Tx]:
        with self._transaction() as cursor:
            yield Tx(cursor, self._paramstyle)

    # --- jobs

    def insert(self, job: Job) -> Job:
        try:
            with self._tx() as tx:
                if job.spec.request_id and (first := self._by_request_id(tx, job.spec.request_id)):
                    return first
                self._check_adapter_free(tx, job.spec.adapter_id)
                tx.execute(
                    f"INSERT INTO jobs (seq, request_id, adapter_id, {JOB_COLUMNS})"
                    f" VALUES ({self._next_seq}, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.spec.request_id or None, job.spec.adapter_id, *_job_values(job)),
                )
        except UniqueViolation:
            # A replica racing this one inserted the same request_id or adapter first.
            with self._tx() as tx:
                if job.spec.request_id and (first := self._by_request_id(tx, job.spec.request_id)):
                    return first
                self._check_adapter_free(tx, job.spec.adapter_id)
            raise
        return job

    def get(self, job_id: str) -> Job | None:
        with self._tx() as tx:
            return _first(tx.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)))

    def find_by_request_id(self, request_id: str) -> Job | None:
        with self._tx() as tx:
            return self._by_request_id(tx, request_id)

    def list(self, *, state: JobState | None, offset: int, limit: int) -> list[Job]:
        where, args = ("WHERE state=?", [state.value]) if state else ("", [])
        with self._tx() as tx:
            rows = tx.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            )
        return [_job(r) for r in rows]

    def in_states(self, *states: JobState) -> builtins.list[Job]:
        marks = ",".join("?" * len(states))
        with self._tx() as tx:
            rows = tx.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seq",
                tuple(s.value for s in states),
            )
        return [_job(r) for r in rows]

    def queue_position(self, job_id: str) -> int:
        with self._tx() as tx:
            rows = tx.execute(
                "SELECT COUNT(*) FROM jobs WHERE state=? AND seq < (SELECT seq FROM jobs"
                " WHERE id=?)",
                (JobState.QUEUED.value, job_id),
            )
        return int(rows[0][0]) if rows else 0

    def count_by_state(self) -> dict[str, int]:
        with self._tx() as tx:
            rows = tx.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {str(state): int(n) for state, n in rows}

    # --- claims

    def claim(self, worker: str, lease_s: float) -> Job | None:
        now = time.time()
        with self._tx() as tx:
            while True:
                rows = tx.execute(
                    "SELECT id, cancel_requested FROM jobs WHERE state=? OR (state=? AND"
                    f" lease_expires_at < ?) ORDER BY seq LIMIT 1{self._claim_lock}",
                    (JobState.QUEUED.value, JobState.RUNNING.value, now),
                )
                if not rows:
                    return None
                job_id, cancel_requested = rows[0]
                if not cancel_requested:
                    break
                # Cancelled while its replica was dead or stopping: it ends, never runs again.
                self._cancelled(tx, job_id, now)
            tx.execute(
                "UPDATE jobs SET state=?, attempts=attempts + 1, fence=fence + 1,"
                " lease_owner=?, lease_expires_at=?, started_at=?, error=NULL,"
                " cancel_requested=0 WHERE id=?",
                (JobState.RUNNING.value, worker, now + lease_s, now, job_id),
            )
            return _first(tx.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)))

    def heartbeat(self, job_id: str, fence: int, lease_s: float) -> bool:
        with self._tx() as tx:
            self._fenced(tx, job_id, fence)
            tx.execute(
                "UPDATE jobs SET lease_expires_at=? WHERE id=?", (time.time() + lease_s, job_id)
            )
            rows = tx.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,))
        return bool(rows[0][0])

    def save_progress(self, job: Job) -> None:
        with self._tx() as tx:
            self._fenced(tx, job.id, job.fence)
            tx.execute(
                "UPDATE jobs SET progress=?, samples=? WHERE id=?",
                (_progress(job), json.dumps(job.samples), job.id),
            )

    def add_loss_points(self, job_id: str, fence: int, points: builtins.list[LossPoint]) -> None:
        with self._tx() as tx:
            self._fenced(tx, job_id, fence)
            for p in points:
                tx.execute(
                    "INSERT INTO loss_curve (job_id, step, epoch, loss, eval_loss)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (job_id, step) DO UPDATE SET"
                    " epoch=excluded.epoch, loss=excluded.loss, eval_loss=excluded.eval_loss",
                    (job_id, p.step, p.epoch, p.loss, p.eval_loss),
                )

    def save_checkpoint(self, job_id: str, fence: int, key: str) -> str:
        with self._tx() as tx:
            self._fenced(tx, job_id, fence)
            previous = tx.execute("SELECT checkpoint FROM jobs WHERE id=?", (job_id,))[0][0]
            tx.execute("UPDATE jobs SET checkpoint=? WHERE id=?", (key, job_id))
        return str(previous or "")

    def finish(self, job: Job) -> None:
        with self._tx() as tx:
            self._fenced(tx, job.id, job.fence)
            self._write_final(tx, job)

    def release(self, job: Job) -> None:
        with self._tx() as tx:
            self._fenced(tx, job.id, job.fence)
            rows = tx.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job.id,))
            if rows[0][0]:  # a cancel its heartbeat had not seen yet
                self._cancelled(tx, job.id, time.time())
                return
            tx.execute(
                "UPDATE jobs SET state=?, attempts=attempts - 1, started_at=NULL, progress=?,"
                " lease_owner=NULL, lease_expires_at=NULL WHERE id=?",
                (JobState.QUEUED.value, json.dumps(dataclasses.asdict(Progress())), job.id),
            )

    def expire_leases(self, worker: str) -> int:
        with self._tx() as tx:
            tx.execute(
                "UPDATE jobs SET lease_expires_at=0 WHERE state=? AND lease_owner=?",
                (JobState.RUNNING.value, worker),
            )
            return tx.rowcount

    def ended_with_checkpoints(self) -> builtins.list[str]:
        final = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)
        with self._tx() as tx:
            rows = tx.execute(
                "SELECT id FROM jobs WHERE checkpoint != '' AND state IN (?, ?, ?)", final
            )
        return [str(r[0]) for r in rows]

    def forget_checkpoint(self, job_id: str) -> None:
        final = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)
        with self._tx() as tx:
            tx.execute(
                "UPDATE jobs SET checkpoint='' WHERE id=? AND state IN (?, ?, ?)",
                (job_id, *final),
            )

    # --- any replica

    def cancel(self, job_id: str) -> Job | None:
        with self._tx() as tx:
            rows = tx.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?{self._row_lock}", (job_id,)
            )
            job = _first(rows)
            if job is None or job.state.final:
                return job
            if job.state is JobState.QUEUED:
                tx.execute(
                    "UPDATE jobs SET state=?, finished_at=? WHERE id=?",
                    (JobState.CANCELLED.value, time.time(), job_id),
                )
            else:
                tx.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
            return _first(tx.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)))

    def loss_curve(self, job_id: str) -> builtins.list[LossPoint]:
        with self._tx() as tx:
            rows = tx.execute(
                "SELECT step, epoch, loss, eval_loss FROM loss_curve WHERE job_id=? ORDER BY step",
                (job_id,),
            )
        return [LossPoint(int(s), float(e), float(lo), ev) for s, e, lo, ev in rows]

    # --- adapters

    def publish(self, job: Job, record: AdapterRecord) -> AdapterRecord:
        try:
            with self._tx() as tx:
                self._fenced(tx, job.id, job.fence)
                existing = self._adapter(tx, record.id)
                if existing is not None and existing.source_job_id != job.id:
                    raise AlreadyExists(f"adapter {record.id!r} already exists", field="adapter_id")
                if existing is None:
                    self._insert_adapter(tx, record)
                self._write_final(tx, job)
                return existing or record
        except UniqueViolation:  # a racing import or publish took the id first
            raise AlreadyExists(
                f"adapter {record.id!r} already exists", field="adapter_id"
            ) from None

    def add_adapter(self, record: AdapterRecord) -> AdapterRecord:
        try:
            with self._tx() as tx:
                if self._adapter(tx, record.id) is not None:
                    raise AlreadyExists(f"adapter {record.id!r} already exists", field="adapter_id")
                self._insert_adapter(tx, record)
        except UniqueViolation:
            raise AlreadyExists(
                f"adapter {record.id!r} already exists", field="adapter_id"
            ) from None
        return record

    def get_adapter(self, adapter_id: str) -> AdapterRecord | None:
        with self._tx() as tx:
            return self._adapter(tx, adapter_id)

    def list_adapters(self) -> builtins.list[AdapterRecord]:
        with self._tx() as tx:
            rows = tx.execute(
                f"SELECT {ADAPTER_COLUMNS} FROM adapters ORDER BY created_at DESC, id"
            )
        return [_adapter_record(r) for r in rows]

    def delete_adapter(self, adapter_id: str) -> AdapterRecord | None:
        with self._tx() as tx:
            record = self._adapter(tx, adapter_id)
            if record is not None:
                tx.execute("DELETE FROM adapters WHERE id=?", (adapter_id,))
        return record

    # --- internals

    def _fenced(self, tx: Tx, job_id: str, fence: int) -> None:
        """LeaseLost unless the job is RUNNING under this fence; holds its row (FOR UPDATE
        on PostgreSQL) until the transaction ends, so no claim slips in between."""
        rows = tx.execute(f"SELECT fence, state FROM jobs WHERE id=?{self._row_lock}", (job_id,))
        if not rows or int(rows[0][0]) != fence or rows[0][1] != JobState.RUNNING.value:
            raise LeaseLost(job_id, fence)

    def _cancelled(self, tx: Tx, job_id: str, now: float) -> None:
        tx.execute(
            "UPDATE jobs SET state=?, finished_at=?, lease_owner=NULL, lease_expires_at=NULL"
            " WHERE id=?",
            (JobState.CANCELLED.value, now, job_id),
        )

    def _write_final(self, tx: Tx, job: Job) -> None:
        tx.execute(
            "UPDATE jobs SET state=?, error=?, finished_at=?, progress=?, samples=?,"
            " lease_owner=NULL, lease_expires_at=NULL WHERE id=?",
            (
                job.state.value,
                _error(job),
                job.finished_at if job.finished_at is not None else time.time(),
                _progress(job),
                json.dumps(job.samples),
                job.id,
            ),
        )

    def _by_request_id(self, tx: Tx, request_id: str) -> Job | None:
        return _first(
            tx.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE request_id=?", (request_id,))
        )

    def _check_adapter_free(self, tx: Tx, adapter_id: str) -> None:
        rows = tx.execute(
            "SELECT id FROM jobs WHERE adapter_id=? AND state IN (?, ?)", (adapter_id, *ACTIVE)
        )
        if rows:
            raise AlreadyExists(
                f"job {rows[0][0]} is already training adapter {adapter_id!r}",
                field="adapter_id",
            )

    def _adapter(self, tx: Tx, adapter_id: str) -> AdapterRecord | None:
        rows = tx.execute(f"SELECT {ADAPTER_COLUMNS} FROM adapters WHERE id=?", (adapter_id,))
        return _adapter_record(rows[0]) if rows else None

    def _insert_adapter(self, tx: Tx, r: AdapterRecord) -> None:
        tx.execute(
            f"INSERT INTO adapters ({ADAPTER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (r.id, r.version, r.key, r.info, r.source_job_id, r.created_at),
        )


def _job_values(job: Job) -> tuple[object, ...]:
    """JOB_COLUMNS' values, in order."""
    return (
        job.id,
        job.state.value,
        json.dumps(job.spec.to_dict()),
        _progress(job),
        _error(job),
        job.created_at,
        job.started_at,
        job.finished_at,
        job.attempts,
        json.dumps(job.samples),
        job.fence,
        job.checkpoint,
        int(job.cancel_requested),
    )


def _progress(job: Job) -> str:
    return json.dumps(dataclasses.asdict(job.progress))


def _error(job: Job) -> str | None:
    return json.dumps(dataclasses.asdict(job.error)) if job.error else None


def _first(rows: list[tuple[Any, ...]]) -> Job | None:
    return _job(rows[0]) if rows else None


def _job(r: tuple[Any, ...]) -> Job:
    (id_, state, spec, progress, error, created, started, finished, attempts, samples) = r[:10]
    fence, checkpoint, cancel_requested = r[10:]
    failure = json.loads(error) if error else None
    return Job(
        id=str(id_),
        spec=JobSpec.from_dict(json.loads(spec)),
        state=JobState(state),
        progress=Progress(**json.loads(progress)),
        created_at=float(created),
        started_at=None if started is None else float(started),
        finished_at=None if finished is None else float(finished),
        error=JobFailure(**failure) if failure else None,
        attempts=int(attempts),
        samples=json.loads(samples) if samples else [],
        fence=int(fence),
        checkpoint=str(checkpoint or ""),
        cancel_requested=bool(cancel_requested),
    )


def _adapter_record(r: tuple[Any, ...]) -> AdapterRecord:
    id_, version, key, info, source_job_id, created_at = r
    return AdapterRecord(
        id=str(id_),
        version=str(version),
        key=str(key),
        info=str(info),
        source_job_id=str(source_job_id or ""),
        created_at=float(created_at),
    )
