"""The shared job store: PostgreSQL, for replicas on several machines. It runs the same
statements as SQLite (store_sql.py); claims lock the row they pick with FOR UPDATE SKIP
LOCKED, so replicas claiming at once take different jobs without waiting on each other, and
a fenced write holds its job's row (FOR UPDATE) until it commits, so no claim slips in
between the fence check and the write.

Connections. The store is called from many threads (the RPC pool's 32, the worker, its
heartbeats), so it keeps a small pool of its own: at most `max_connections` (8), an idle
one reused by the next transaction, a new one opened only when every open one is busy.
Not one connection per thread: a replica would hold 40 connections, mostly idle, and ten
replicas would pass PostgreSQL's default limit of 100. Not one connection behind a lock:
every call would queue behind the slowest one, heartbeats included, and while PostgreSQL
is unreachable each waiting call would sit out the previous one's connect timeout.
(psycopg_pool does this too; its background threads are more than this needs.)

Failures. Any error that means the connection or the server is gone (OperationalError,
InterfaceError, a connection psycopg marks broken) comes out as Unavailable; the broken
connection is dropped, so the next call connects again by itself and a replica recovers
once PostgreSQL is back, with no restart. An idle connection found dead when its
transaction begins (the server restarted while it sat in the pool) is replaced at once
and the call goes on, so the first calls after a recovery do not fail. Connections time
out: 5 s to connect, 15 s a statement, and keepalives find a silent peer in about 10 s.

Credentials. libpq's own: PGPASSWORD, PGPASSFILE (~/.pgpass) or a password in the URL,
which is tolerated but never logged (`url` is redacted). Settings in the URL (sslmode,
connect_timeout, options, ...) take precedence over the defaults here."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from tuneserve.errors import InvalidArgument, Unavailable
from tuneserve.jobs.store import redact
from tuneserve.jobs.store_sql import SqlJobStore, UniqueViolation

log = logging.getLogger(__name__)

# Each migration takes the schema from its index to the next; schema_version holds one row
# per migration run. Every replica migrates at start-up, under this advisory lock (scoped
# to the database), so replicas starting at once migrate once and the others wait.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE SEQUENCE jobs_seq;
    CREATE TABLE jobs (
        id               TEXT PRIMARY KEY,
        seq              BIGINT NOT NULL,
        state            TEXT NOT NULL,
        spec             TEXT NOT NULL,
        progress         TEXT NOT NULL,
        error            TEXT,
        created_at       DOUBLE PRECISION NOT NULL,
        started_at       DOUBLE PRECISION,
        finished_at      DOUBLE PRECISION,
        attempts         INTEGER NOT NULL DEFAULT 0,
        request_id       TEXT UNIQUE,
        samples          TEXT,
        adapter_id       TEXT NOT NULL,
        fence            BIGINT NOT NULL DEFAULT 0,
        lease_owner      TEXT,
        lease_expires_at DOUBLE PRECISION,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        checkpoint       TEXT NOT NULL DEFAULT ''
    );
    ALTER SEQUENCE jobs_seq OWNED BY jobs.seq;
    CREATE UNIQUE INDEX jobs_active_adapter ON jobs (adapter_id)
        WHERE state IN ('QUEUED', 'RUNNING');
    CREATE INDEX jobs_state ON jobs (state, seq);
    CREATE TABLE loss_curve (
        job_id    TEXT NOT NULL,
        step      INTEGER NOT NULL,
        epoch     DOUBLE PRECISION NOT NULL,
        loss      DOUBLE PRECISION NOT NULL,
        eval_loss DOUBLE PRECISION,
        PRIMARY KEY (job_id, step)
    );
    CREATE TABLE adapters (
        id            TEXT PRIMARY KEY,
        version       TEXT NOT NULL,
        key           TEXT NOT NULL,
        info          TEXT NOT NULL,
        source_job_id TEXT NOT NULL DEFAULT '',
        created_at    DOUBLE PRECISION NOT NULL
    );
    """,
)
MIGRATION_LOCK = 0x74756E6573657276  # "tuneserv": pg_advisory_xact_lock's key

MAX_CONNECTIONS = 8
# libpq settings a URL may override. Keepalives: 5 s idle, then 3 probes 2 s apart.
CONNECT_DEFAULTS = {
    "connect_timeout": "5",
    "application_name": "tuneserve",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
}
# Server settings for each session, before any the URL's `options` give. A transaction
# here is a few short statements; one that waits longer than this is stuck.
SESSION_OPTIONS = "-c statement_timeout=15s -c idle_in_transaction_session_timeout=30s"
CHECKOUT_TIMEOUT_S = 15.0  # waiting for one of the pool's connections to be free
MIGRATION_TIMEOUT = "5min"  # another replica may hold the lock while it migrates


class PostgresJobStore(SqlJobStore):
    """Thread-safe: every method may be called from any thread; each call is one
    transaction on one of the pool's connections."""

    _paramstyle = "format"
    _claim_lock = " FOR UPDATE SKIP LOCKED"
    _row_lock = " FOR UPDATE"
    _next_seq = "nextval('jobs_seq')"

    def __init__(self, url: str, *, max_connections: int = MAX_CONNECTIONS) -> None:
        """Connect and migrate the schema: Unavailable if PostgreSQL cannot be reached (or
        refuses the credentials), InvalidArgument if `url` is malformed."""
        try:
            self.url = redact(url)
            given = conninfo_to_dict(url)
        except (ValueError, psycopg.ProgrammingError) as e:
            # libpq's reason may quote the URL or a piece of the password: never shown.
            reason = str(e).replace(url, "the URL")
            if password := _password(url):
                reason = reason.replace(password, "***")
            raise InvalidArgument(
                f"job_store: not a PostgreSQL URL: {reason}", field="job_store"
            ) from None
        params: dict[str, Any] = {**CONNECT_DEFAULTS, **given}
        params["options"] = f"{SESSION_OPTIONS} {params.get('options', '')}".strip()
        self._params = params
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = False
        self._migrate()

    def _migrate(self) -> None:
        with self._transaction() as cur:
            cur.execute(f"SET LOCAL statement_timeout = '{MIGRATION_TIMEOUT}'")
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                " migrated_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            row = cur.fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                # A newer release migrated it (a rolling update): its migrations only add.
                log.warning(
                    "job store %s: schema version %d is newer than this release's %d",
                    self.url,
                    version,
                    len(MIGRATIONS),
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                cur.execute(script)
                cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
            if version < len(MIGRATIONS):
                log.info(
                    "job store %s: schema migrated from version %d to %d",
                    self.url,
                    version,
                    len(MIGRATIONS),
                )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction on a pooled connection. A pooled connection that fails to begin
        died while idle (the server restarted): the others idle with it are dropped too,
        and one new connection is tried before the call fails."""
        for attempt in range(2):
            conn, reused = self._checkout()
            begun = False
            try:
                with conn.transaction():
                    begun = True
                    with conn.cursor() as cur:
                        yield cur
                return
            except psycopg.errors.UniqueViolation as e:
                raise UniqueViolation(str(e)) from e
            except psycopg.Error as e:
                if not (
                    conn.broken or isinstance(e, psycopg.OperationalError | psycopg.InterfaceError)
                ):
                    raise
                conn.close()  # its session may be gone; the next call opens a new one
                if reused and not begun and attempt == 0:
                    log.info("job store %s: dropping idle connections (%s)", self.url, e)
                    self._drop_idle()
                    continue
                raise _unavailable(e) from e
            finally:
                self._give_back(conn)

    def _checkout(self) -> tuple[psycopg.Connection[Any], bool]:
        """An idle connection (True) or a new one (False); holds one of the pool's slots
        until `_give_back`."""
        if not self._slots.acquire(timeout=CHECKOUT_TIMEOUT_S):
            raise Unavailable(
                f"the job store (PostgreSQL) is busy: all {self._max_connections} connections "
                f"were in use for {CHECKOUT_TIMEOUT_S:.0f} s"
            )
        try:
            with self._lock:
                if self._closed:
                    raise Unavailable("the job store is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is not None:
                return conn, True
            try:
                return psycopg.connect(
                    autocommit=True, prepare_threshold=None, **self._params
                ), False
            except psycopg.Error as e:
                raise _unavailable(e) from e
        except BaseException:
            self._slots.release()
            raise

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        """Back to the pool if it is healthy and out of its transaction; closed otherwise."""
        healthy = (
            not conn.closed
            and not conn.broken
            and conn.info.transaction_status == TransactionStatus.IDLE
        )
        with self._lock:
            keep = healthy and not self._closed
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        self._slots.release()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        """Close the idle connections now, the busy ones when their transactions end."""
        with self._lock:
            self._closed = True
        self._drop_idle()


def _password(url: str) -> str:
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def _unavailable(e: psycopg.Error) -> Unavailable:
    reason = str(e).strip().replace("\n", " ") or type(e).__name__
    return Unavailable(f"the job store (PostgreSQL) is unreachable: {reason}")
