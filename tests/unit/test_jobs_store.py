"""tuneserve.jobs.store: one suite, run against every backend (SQLite, and PostgreSQL on a
real server started by tests/postgres.py). Two stores opened on one database stand for two
replicas."""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tuneserve.errors import AlreadyExists
from tuneserve.jobs.model import (
    DatasetFormat,
    Job,
    JobFailure,
    JobSpec,
    JobState,
    LoraSpec,
    Progress,
)
from tuneserve.jobs.store import AdapterRecord, JobStore, LeaseLost, LossPoint, open_job_store
from tuneserve.jobs.store_sqlite import SQLiteJobStore

Opener = Callable[[], JobStore]


def make_job(job_id: str, *, request_id: str = "", adapter_id: str = "") -> Job:
    spec = JobSpec(
        base_model="gpt2",
        adapter_id=adapter_id or f"adapter-{job_id}",
        dataset_format=DatasetFormat.TEXT,
        dataset_rows=2,
        lora=LoraSpec(r=4, alpha=8.0, target_modules=("c_attn",)),
        request_id=request_id,
    )
    return Job(id=job_id, spec=spec, created_at=1000.0)


def record(adapter_id: str, job_id: str = "", version: str = "v1") -> AdapterRecord:
    return AdapterRecord(
        id=adapter_id,
        version=version,
        key=f"adapters/{adapter_id}/{version}",
        info=json.dumps({"id": adapter_id}),
        source_job_id=job_id,
        created_at=time.time(),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens stores on one fresh database; each store stands for a replica."""
    opened: list[JobStore] = []
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path / 'db' / 'jobs.sqlite3'}"
    else:
        from tests.postgres import fresh_database

        url = fresh_database(request)

    def open_() -> JobStore:
        store = open_job_store(url, default_path=tmp_path / "unused")
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(opener: Opener) -> JobStore:
    return opener()


def test_insert_then_get_returns_an_equal_job(store: JobStore) -> None:
    job = make_job("j1", request_id="r1")
    assert store.insert(job) == job
    assert store.get("j1") == job
    assert store.get("missing") is None


def test_a_request_id_names_one_job_across_replicas(opener: Opener) -> None:
    a, b = opener(), opener()
    first = a.insert(make_job("j1", request_id="req"))
    again = b.insert(make_job("j2", request_id="req", adapter_id="other"))
    assert again.id == first.id == "j1"
    assert b.get("j2") is None
    found = a.find_by_request_id("req")
    assert found is not None and found.id == "j1"
    assert a.find_by_request_id("nope") is None
    a.insert(make_job("j3"))
    a.insert(make_job("j4"))  # jobs without a request id never collide


def test_racing_inserts_of_one_request_id_make_one_job(opener: Opener) -> None:
    stores = [opener() for _ in range(4)]
    results: list[str] = []
    barrier = threading.Barrier(len(stores))

    def submit(i: int) -> None:
        barrier.wait()
        job = stores[i].insert(make_job(f"j{i}", request_id="same", adapter_id=f"a{i}"))
        results.append(job.id)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert len(stores[0].list(state=None, offset=0, limit=10)) == 1


def test_one_adapter_id_is_trained_by_one_active_job(store: JobStore) -> None:
    store.insert(make_job("a", adapter_id="shared"))
    with pytest.raises(AlreadyExists, match="already training adapter 'shared'"):
        store.insert(make_job("b", adapter_id="shared"))
    store.cancel("a")
    store.insert(make_job("c", adapter_id="shared"))  # a cancelled job frees the id


def test_list_is_newest_first_with_paging_and_state(store: JobStore) -> None:
    for i in range(5):
        store.insert(make_job(f"j{i}"))
    ids = [j.id for j in store.list(state=None, offset=0, limit=100)]
    assert ids == ["j4", "j3", "j2", "j1", "j0"]
    assert [j.id for j in store.list(state=None, offset=1, limit=2)] == ["j3", "j2"]
    assert store.list(state=None, offset=5, limit=2) == []
    store.cancel("j1")
    assert [j.id for j in store.list(state=JobState.CANCELLED, offset=0, limit=9)] == ["j1"]
    assert [j.id for j in store.in_states(JobState.QUEUED)] == ["j0", "j2", "j3", "j4"]
    assert store.queue_position("j3") == 2
    assert store.count_by_state() == {"QUEUED": 4, "CANCELLED": 1}


def test_claims_take_the_oldest_job_once(opener: Opener) -> None:
    a, b = opener(), opener()
    for i in range(3):
        a.insert(make_job(f"j{i}"))
    first, second = a.claim("w1", 30), b.claim("w2", 30)
    assert first is not None and second is not None
    assert (first.id, second.id) == ("j0", "j1")
    assert first.state is JobState.RUNNING and first.attempts == 1 and first.fence == 1
    assert first.started_at is not None
    third = a.claim("w1", 30)
    assert third is not None and third.id == "j2"
    assert b.claim("w2", 30) is None


def test_concurrent_claims_never_share_a_job(opener: Opener) -> None:
    stores = [opener() for _ in range(4)]
    for i in range(20):
        stores[0].insert(make_job(f"j{i:02d}"))
    claimed: list[str] = []
    lock = threading.Lock()

    def work(store: JobStore, name: str) -> None:
        while (job := store.claim(name, 30)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(s, f"w{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == [f"j{i:02d}" for i in range(20)]


def test_an_expired_lease_is_claimed_again_with_a_new_fence(opener: Opener) -> None:
    a, b = opener(), opener()
    a.insert(make_job("j"))
    old = a.claim("dead", 0.2)
    assert old is not None
    assert b.claim("w2", 30) is None  # leased
    time.sleep(0.3)
    new = b.claim("w2", 30)
    assert new is not None and new.id == "j"
    assert (new.fence, new.attempts) == (old.fence + 1, 2)
    # The old worker can write nothing more.
    old.progress = Progress(step=5)
    with pytest.raises(LeaseLost):
        a.save_progress(old)
    with pytest.raises(LeaseLost):
        a.heartbeat("j", old.fence, 30)
    with pytest.raises(LeaseLost):
        a.add_loss_points("j", old.fence, [LossPoint(1, 0.1, 2.0)])
    with pytest.raises(LeaseLost):
        a.save_checkpoint("j", old.fence, "checkpoints/j/1-5")
    with pytest.raises(LeaseLost):
        a.publish(old, record("adapter-j", "j"))
    old.state = JobState.FAILED
    with pytest.raises(LeaseLost):
        a.finish(old)
    assert b.get_adapter("adapter-j") is None
    got = b.get("j")
    assert got is not None and got.state is JobState.RUNNING and got.progress.step == 0


def test_heartbeats_keep_the_lease(opener: Opener) -> None:
    a, b = opener(), opener()
    a.insert(make_job("j"))
    job = a.claim("w1", 0.3)
    assert job is not None
    for _ in range(4):
        time.sleep(0.15)
        assert a.heartbeat("j", job.fence, 0.3) is False
        assert b.claim("w2", 30) is None


def test_expire_leases_frees_a_restarted_replicas_jobs(opener: Opener) -> None:
    a = opener()
    a.insert(make_job("j"))
    a.insert(make_job("k"))
    assert a.claim("pod-1", 3600) is not None
    assert a.claim("pod-2", 3600) is not None
    assert a.expire_leases("pod-1") == 1
    again = opener().claim("pod-1", 30)
    assert again is not None and again.id == "j" and again.attempts == 2


def test_progress_loss_points_and_checkpoints_under_the_claim(store: JobStore) -> None:
    store.insert(make_job("j"))
    job = store.claim("w", 30)
    assert job is not None
    job.progress = Progress(step=3, total_steps=9, loss=1.25, trained_tokens=40)
    job.samples = [{"prompt": "p", "reference": "r", "generated": "g"}]
    store.save_progress(job)
    store.add_loss_points("j", job.fence, [LossPoint(1, 0.1, 3.0), LossPoint(2, 0.2, 2.0)])
    store.add_loss_points("j", job.fence, [LossPoint(2, 0.2, 1.5, eval_loss=1.4)])
    assert store.loss_curve("j") == [LossPoint(1, 0.1, 3.0), LossPoint(2, 0.2, 1.5, 1.4)]
    assert store.save_checkpoint("j", job.fence, "checkpoints/j/1-2") == ""
    assert store.save_checkpoint("j", job.fence, "checkpoints/j/1-4") == "checkpoints/j/1-2"
    got = store.get("j")
    assert got is not None
    assert got.progress == job.progress and got.samples == job.samples
    assert got.checkpoint == "checkpoints/j/1-4"


def test_finish_writes_the_final_state_and_ends_the_claim(store: JobStore) -> None:
    store.insert(make_job("j"))
    job = store.claim("w", 30)
    assert job is not None
    job.state = JobState.FAILED
    job.error = JobFailure(code="INVALID_DATASET", message="bad", field="f", row=4)
    store.finish(job)
    got = store.get("j")
    assert got is not None and got.state is JobState.FAILED
    assert got.error == job.error and got.finished_at is not None
    assert store.claim("w", 30) is None
    with pytest.raises(LeaseLost):
        store.heartbeat("j", job.fence, 30)


def test_release_puts_a_job_back_in_its_place(store: JobStore) -> None:
    store.insert(make_job("a"))
    store.insert(make_job("b"))
    job = store.claim("w", 30)
    assert job is not None and job.id == "a"
    store.save_checkpoint("a", job.fence, "checkpoints/a/1-3")
    store.release(job)
    got = store.get("a")
    assert got is not None and got.state is JobState.QUEUED and got.attempts == 0
    assert got.checkpoint == "checkpoints/a/1-3"
    again = store.claim("w", 30)
    assert again is not None and again.id == "a" and again.fence == job.fence + 1


def test_cancel_a_queued_job_or_ask_a_running_ones_worker(opener: Opener) -> None:
    a, b = opener(), opener()
    a.insert(make_job("q"))
    a.insert(make_job("r"))
    cancelled = b.cancel("q")
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    running = a.claim("w", 30)
    assert running is not None and running.id == "r"
    asked = b.cancel("r")
    assert asked is not None and asked.state is JobState.RUNNING and asked.cancel_requested
    assert a.heartbeat("r", running.fence, 30) is True
    assert b.cancel("missing") is None
    ended = b.cancel("q")
    assert ended is not None and ended.state is JobState.CANCELLED


def test_publish_indexes_the_adapter_and_ends_the_job_at_once(opener: Opener) -> None:
    a, b = opener(), opener()
    a.insert(make_job("j", adapter_id="mine"))
    job = a.claim("w", 30)
    assert job is not None
    job.state, job.samples = JobState.SUCCEEDED, [{"prompt": "p"}]
    published = a.publish(job, record("mine", "j"))
    assert published.key == "adapters/mine/v1"
    got = b.get("j")
    assert got is not None and got.state is JobState.SUCCEEDED and got.samples == job.samples
    seen = b.get_adapter("mine")
    assert seen is not None and seen.source_job_id == "j"
    assert [r.id for r in b.list_adapters()] == ["mine"]


def test_publishing_a_taken_adapter_id_writes_nothing(store: JobStore) -> None:
    store.add_adapter(record("taken"))
    store.insert(make_job("j", adapter_id="taken"))
    job = store.claim("w", 30)
    assert job is not None
    job.state = JobState.SUCCEEDED
    with pytest.raises(AlreadyExists):
        store.publish(job, record("taken", "j", version="v2"))
    got = store.get("j")
    assert got is not None and got.state is JobState.RUNNING
    taken = store.get_adapter("taken")
    assert taken is not None and taken.version == "v1"


def test_adapters_add_list_and_delete(opener: Opener) -> None:
    a, b = opener(), opener()
    a.add_adapter(record("one"))
    time.sleep(0.01)
    a.add_adapter(record("two"))
    with pytest.raises(AlreadyExists):
        b.add_adapter(record("one", version="v9"))
    assert [r.id for r in b.list_adapters()] == ["two", "one"]
    removed = b.delete_adapter("one")
    assert removed is not None and removed.key == "adapters/one/v1"
    assert a.get_adapter("one") is None
    assert b.delete_adapter("one") is None
    a.add_adapter(record("one", version="v2"))  # a new version under a freed id
    again = b.get_adapter("one")
    assert again is not None and again.version == "v2"


def test_survives_reopening(opener: Opener) -> None:
    first = opener()
    first.insert(make_job("a", request_id="req"))
    first.insert(make_job("b"))
    first.close()
    second = opener()
    assert [j.id for j in second.list(state=None, offset=0, limit=10)] == ["b", "a"]
    second.insert(make_job("c"))  # numbering continues after the old jobs
    assert [j.id for j in second.in_states(JobState.QUEUED)] == ["a", "b", "c"]


def test_a_version_0_sqlite_database_is_migrated(tmp_path: Path) -> None:
    """A database of the single-process releases: its jobs keep their places, a RUNNING one
    (its process died) is claimable at once, adapter ids come from the specs."""
    import json
    import sqlite3

    from tuneserve.jobs.store_sqlite import MIGRATIONS

    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    for seq, (job_id, state) in enumerate([("old", "RUNNING"), ("next", "QUEUED")], start=1):
        job = make_job(job_id)
        db.execute(
            "INSERT INTO jobs (id, seq, state, spec, progress, created_at, attempts, samples,"
            " request_id) VALUES (?, ?, ?, ?, '{}', 1.0, 1, '[]', '')",
            (job_id, seq, state, json.dumps(job.spec.to_dict())),
        )
    db.commit()
    db.close()
    store = SQLiteJobStore(path)
    try:
        claimed = store.claim("w", 30)
        assert claimed is not None and claimed.id == "old" and claimed.fence == 2
        with pytest.raises(AlreadyExists):
            store.insert(make_job("dup", adapter_id="adapter-next"))
    finally:
        store.close()


def test_a_full_sqlite_database_is_reported_as_a_full_disk(tmp_path: Path) -> None:
    """SQLite's SQLITE_FULL ("database or disk is full") comes out as OSError(ENOSPC), which
    the job manager reports as DISK_FULL; here the database is capped at its current size."""
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    try:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(OSError) as info:
            for i in range(1000):
                store.insert(make_job(f"j{i}"))
        assert info.value.errno == errno.ENOSPC
    finally:
        store.close()


def test_a_job_cancelled_while_its_replica_was_dead_is_never_claimed_again(
    opener: Opener,
) -> None:
    a, b = opener(), opener()
    a.insert(make_job("j"))
    a.insert(make_job("next"))
    dead = a.claim("dead", 0.2)
    assert dead is not None and dead.id == "j"
    asked = b.cancel("j")  # its worker will never see the heartbeat
    assert asked is not None and asked.cancel_requested
    time.sleep(0.3)
    claimed = b.claim("w2", 30)
    assert claimed is not None and claimed.id == "next"
    ended = b.get("j")
    assert ended is not None and ended.state is JobState.CANCELLED
    assert ended.finished_at is not None


def test_a_job_released_with_a_cancel_pending_ends_cancelled(store: JobStore) -> None:
    store.insert(make_job("j"))
    job = store.claim("w", 30)
    assert job is not None
    store.cancel("j")  # asked just before a shutdown, before the heartbeat saw it
    store.release(job)
    got = store.get("j")
    assert got is not None and got.state is JobState.CANCELLED
    assert store.claim("w", 30) is None


def test_urls_are_logged_without_passwords() -> None:
    from tuneserve.jobs.store import redact

    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db?sslmode=require&password=secret") == (
        "postgresql://u@h/db?sslmode=require&password=***"
    )
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
