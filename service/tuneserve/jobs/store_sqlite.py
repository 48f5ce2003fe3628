"""The embedded job store: one SQLite file, the default. It claims, leases and fences jobs
with the same statements as PostgreSQL (store_sql.py); SQLite lets one writer in at a time
(every transaction is BEGIN IMMEDIATE), so a claim needs no row locks. Several processes
may share the file on one machine (WAL mode, a busy timeout); replicas on several machines
need PostgreSQL."""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from tuneserve.jobs.store_sql import SqlJobStore, UniqueViolation

# Each migration takes the schema from its index to the next; PRAGMA user_version holds
# how many have run. Version 0 is the single-process schema of the first releases.
MIGRATIONS: tuple[str, ...] = (
    """
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
    """,
    # Claims, leases and fences; the adapter index.
    """
    ALTER TABLE jobs ADD COLUMN adapter_id TEXT NOT NULL DEFAULT '';
    UPDATE jobs SET adapter_id = json_extract(spec, '$.adapter_id');
    ALTER TABLE jobs ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET fence = attempts;
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
    UPDATE jobs SET lease_expires_at = 0 WHERE state = 'RUNNING';
    ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN checkpoint TEXT NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX jobs_active_adapter ON jobs(adapter_id)
        WHERE state IN ('QUEUED', 'RUNNING');
    CREATE TABLE adapters (
        id            TEXT PRIMARY KEY,
        version       TEXT NOT NULL,
        key           TEXT NOT NULL,
        info          TEXT NOT NULL,
        source_job_id TEXT NOT NULL DEFAULT '',
        created_at    REAL NOT NULL
    );
    """,
)


class SQLiteJobStore(SqlJobStore):
    """One connection guarded by a lock: the service writes a handful of rows a second."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"sqlite://{path.resolve()}"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._migrate()

    def _migrate(self) -> None:
        with self._transaction() as cur:
            version = cur.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version):
                for statement in filter(str.strip, script.split(";")):
                    cur.execute(statement)
                cur.execute(f"PRAGMA user_version={number + 1}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE under the lock; SQLite's "database or disk is full" comes out as
        the OSError (ENOSPC) it is, so callers report a full disk, not an internal error."""
        with self._lock:
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield cur
                except BaseException:
                    self._db.rollback()
                    raise
                cur.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                if "UNIQUE" in str(e):
                    raise UniqueViolation(str(e)) from e
                raise
            except sqlite3.OperationalError as e:
                if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.rollback()
                    raise OSError(errno.ENOSPC, f"the job store's disk is full ({e})") from e
                raise
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()
