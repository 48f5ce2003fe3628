"""tuneserve.jobs.store_postgres: what only the PostgreSQL store does, on a real server
(tests/postgres.py). The behaviour both stores share is tests/unit/test_jobs_store.py's."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.postgres import (
    PASSWORD_USER,
    PASSWORD_USER_PASSWORD,
    PostgresServer,
    fresh_database,
    postgres_server,
)
from tuneserve.errors import InvalidArgument, Unavailable
from tuneserve.jobs.model import DatasetFormat, Job, JobSpec, JobState, LoraSpec
from tuneserve.jobs.store_postgres import MAX_CONNECTIONS, MIGRATIONS, PostgresJobStore

Opener = Callable[[str], PostgresJobStore]


def make_job(job_id: str) -> Job:
    spec = JobSpec(
        base_model="gpt2",
        adapter_id=f"adapter-{job_id}",
        dataset_format=DatasetFormat.TEXT,
        dataset_rows=2,
        lora=LoraSpec(r=4, alpha=8.0, target_modules=("c_attn",)),
    )
    return Job(id=job_id, spec=spec, created_at=1000.0)


@pytest.fixture
def server() -> PostgresServer:
    return postgres_server()


@pytest.fixture
def url(request: pytest.FixtureRequest) -> str:
    return fresh_database(request)


@pytest.fixture
def opener() -> Iterator[Opener]:
    """Opens stores (replicas); all are closed after the test."""
    opened: list[PostgresJobStore] = []

    def open_(url: str) -> PostgresJobStore:
        store = PostgresJobStore(url)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def test_replicas_starting_at_once_migrate_once(
    server: PostgresServer, url: str, opener: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tuneserve.jobs.store_postgres")
    barrier = threading.Barrier(4)

    def start(_: int) -> PostgresJobStore:
        barrier.wait()
        return opener(url)

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(start, range(4)))
    migrated = [r for r in caplog.records if "schema migrated" in r.getMessage()]
    assert len(migrated) == 1
    with server.connect(url.rsplit("/", 1)[1]) as conn:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [v for (v,) in versions] == list(range(1, len(MIGRATIONS) + 1))
    stores[0].insert(make_job("j"))
    assert all(s.get("j") is not None for s in stores)


def test_a_store_recovers_by_itself_when_postgresql_comes_back(
    server: PostgresServer, url: str, opener: Opener
) -> None:
    """Calls fail fast with Unavailable while the server is down, a call in flight
    included; once it is back, every store works again without being reopened, the first
    call included (its idle connections died with the old server)."""
    used, idle = opener(url), opener(url)
    used.insert(make_job("a"))
    assert idle.get("a") is not None  # leaves a connection in its pool
    locker = server.connect(url.rsplit("/", 1)[1])
    locker.execute("SELECT 1 FROM jobs WHERE id='a' FOR UPDATE")
    pool = ThreadPoolExecutor(1)
    try:
        in_flight = pool.submit(used.cancel, "a")  # waits for the row lock
        time.sleep(0.3)
        assert not in_flight.done()
        server.stop()
        with pytest.raises(Unavailable, match="unreachable"):
            in_flight.result(timeout=5)
        for call in (
            lambda: used.get("a"),
            lambda: used.insert(make_job("b")),
            lambda: used.claim("w", 30),
            lambda: opener(url),  # a replica starting meanwhile
        ):
            started = time.monotonic()
            with pytest.raises(Unavailable, match=r"the job store \(PostgreSQL\) is unreachable"):
                call()
            assert time.monotonic() - started < 5
    finally:
        pool.shutdown()
        locker.close()
        if not server.running:
            server.start()
    assert idle.get("a") is not None
    used.insert(make_job("b"))
    claimed = used.claim("w", 30)
    assert claimed is not None and claimed.id == "a"
    assert [j.id for j in opener(url).list(state=None, offset=0, limit=9)] == ["b", "a"]


def test_the_url_never_shows_the_password(
    server: PostgresServer,
    request: pytest.FixtureRequest,
    opener: Opener,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PASSWORD_USER logs in with its password only: from the URL or from PGPASSWORD."""
    caplog.set_level(logging.DEBUG)
    dbname = server.create_database(owner=PASSWORD_USER).rsplit("/", 1)[1]
    url = server.url(dbname, user=PASSWORD_USER, password=PASSWORD_USER_PASSWORD)
    request.addfinalizer(lambda: server.drop_database(url))
    store = opener(url)
    store.insert(make_job("j"))
    assert PASSWORD_USER_PASSWORD not in store.url
    assert store.url == url.replace(f":{PASSWORD_USER_PASSWORD}@", ":***@")
    with pytest.raises(Unavailable, match="password authentication failed") as wrong:
        opener(server.url(dbname, user=PASSWORD_USER, password="not-the-Pa55"))
    assert "not-the-Pa55" not in str(wrong.value)
    for malformed in (
        f"postgresql://{PASSWORD_USER}:{PASSWORD_USER_PASSWORD}@[::1/{dbname}",
        f"postgresql://{PASSWORD_USER}:bad%zzPa55@127.0.0.1:{server.port}/{dbname}",
    ):
        with pytest.raises(InvalidArgument, match="not a PostgreSQL URL") as info:
            opener(malformed)
        assert PASSWORD_USER_PASSWORD not in str(info.value) and "zzPa55" not in str(info.value)
    monkeypatch.setenv("PGPASSWORD", PASSWORD_USER_PASSWORD)
    from_env = opener(server.url(dbname, user=PASSWORD_USER))
    assert from_env.get("j") is not None
    assert PASSWORD_USER_PASSWORD not in caplog.text


def test_eight_replicas_claiming_200_jobs_never_share_one(url: str, opener: Opener) -> None:
    stores = [opener(url) for _ in range(8)]
    for i in range(200):
        stores[i % 8].insert(make_job(f"j{i:03d}"))
    barrier = threading.Barrier(len(stores))

    def drain(i: int) -> list[str]:
        barrier.wait()
        claimed = []
        while (job := stores[i].claim(f"w{i}", 30)) is not None:
            claimed.append(job.id)
        return claimed

    with ThreadPoolExecutor(len(stores)) as pool:
        claims = [job_id for ids in pool.map(drain, range(len(stores))) for job_id in ids]
    assert sorted(claims) == [f"j{i:03d}" for i in range(200)]
    assert {(j.attempts, j.fence) for j in stores[0].in_states(JobState.RUNNING)} == {(1, 1)}


def test_a_claim_skips_the_row_another_claim_holds(
    server: PostgresServer, url: str, opener: Opener
) -> None:
    store = opener(url)
    store.insert(make_job("first"))
    store.insert(make_job("second"))
    with server.connect(url.rsplit("/", 1)[1]) as other:  # a replica mid-claim
        other.execute("SELECT 1 FROM jobs WHERE id='first' FOR UPDATE")
        started = time.monotonic()
        job = store.claim("w", 30)
        assert job is not None and job.id == "second"
        assert time.monotonic() - started < 1
    job = store.claim("w", 30)
    assert job is not None and job.id == "first"


def test_a_store_holds_a_few_connections_for_many_threads(
    server: PostgresServer, url: str, opener: Opener
) -> None:
    store = opener(url)
    store.insert(make_job("j"))
    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(lambda _: store.get("j") is not None, range(640)))
    with server.connect(url.rsplit("/", 1)[1]) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname=current_database()"
            " AND application_name='tuneserve'"
        ).fetchone()
    assert row is not None and 1 <= row[0] <= MAX_CONNECTIONS
    store.close()
    with pytest.raises(Unavailable, match="closed"):
        store.get("j")
