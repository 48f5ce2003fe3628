"""tuneserve.jobs.store: the SQLite job store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tuneserve.jobs.model import (
    DatasetFormat,
    Job,
    JobFailure,
    JobSpec,
    JobState,
    LoraSpec,
    Progress,
)
from tuneserve.jobs.store import SQLiteJobStore


def make_job(job_id: str, *, state: JobState = JobState.QUEUED, request_id: str = "") -> Job:
    spec = JobSpec(
        base_model="gpt2",
        adapter_id=f"adapter-{job_id}",
        dataset_format=DatasetFormat.TEXT,
        dataset_rows=2,
        lora=LoraSpec(r=4, alpha=8.0, target_modules=("c_attn",)),
        request_id=request_id,
    )
    return Job(id=job_id, spec=spec, state=state, created_at=1000.0)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    s = SQLiteJobStore(tmp_path / "db" / "jobs.sqlite3")
    yield s
    s.close()


def test_insert_then_get_returns_an_equal_job(store: SQLiteJobStore) -> None:
    job = make_job("j1", request_id="r1")
    store.insert(job)
    assert store.get("j1") == job
    assert store.get("missing") is None


def test_update_persists_every_field(store: SQLiteJobStore) -> None:
    job = make_job("j1")
    store.insert(job)
    job.state = JobState.FAILED
    job.progress = Progress(step=3, total_steps=9, loss=1.25, trained_tokens=40)
    job.error = JobFailure(code="INVALID_DATASET", message="bad", field="f", row=4)
    job.started_at, job.finished_at, job.attempts = 1001.0, 1002.0, 2
    store.update(job)
    got = store.get("j1")
    assert got == job
    assert got is not None and got.error is not None and got.error.row == 4


def test_list_is_newest_first_with_paging(store: SQLiteJobStore) -> None:
    for i in range(5):
        store.insert(make_job(f"j{i}"))
    ids = [j.id for j in store.list(state=None, offset=0, limit=100)]
    assert ids == ["j4", "j3", "j2", "j1", "j0"]
    assert [j.id for j in store.list(state=None, offset=1, limit=2)] == ["j3", "j2"]
    assert [j.id for j in store.list(state=None, offset=4, limit=2)] == ["j0"]
    assert store.list(state=None, offset=5, limit=2) == []


def test_list_filters_by_state(store: SQLiteJobStore) -> None:
    store.insert(make_job("a", state=JobState.SUCCEEDED))
    store.insert(make_job("b", state=JobState.QUEUED))
    store.insert(make_job("c", state=JobState.SUCCEEDED))
    done = store.list(state=JobState.SUCCEEDED, offset=0, limit=10)
    assert [j.id for j in done] == ["c", "a"]
    assert store.list(state=JobState.FAILED, offset=0, limit=10) == []


def test_find_by_request_id(store: SQLiteJobStore) -> None:
    store.insert(make_job("a", request_id="req-a"))
    store.insert(make_job("b"))
    store.insert(make_job("c"))  # several jobs without a request id are fine
    found = store.find_by_request_id("req-a")
    assert found is not None and found.id == "a"
    assert store.find_by_request_id("req-z") is None


def test_in_states_is_oldest_first(store: SQLiteJobStore) -> None:
    store.insert(make_job("a", state=JobState.RUNNING))
    store.insert(make_job("b", state=JobState.SUCCEEDED))
    store.insert(make_job("c", state=JobState.QUEUED))
    store.insert(make_job("d", state=JobState.QUEUED))
    got = store.in_states(JobState.QUEUED, JobState.RUNNING)
    assert [j.id for j in got] == ["a", "c", "d"]
    assert [j.id for j in store.in_states(JobState.QUEUED)] == ["c", "d"]


def test_order_is_insertion_order_even_after_updates(store: SQLiteJobStore) -> None:
    a, b = make_job("a"), make_job("b")
    store.insert(a)
    store.insert(b)
    a.state = JobState.RUNNING
    store.update(a)
    a.state = JobState.QUEUED
    store.update(a)
    assert [j.id for j in store.in_states(JobState.QUEUED)] == ["a", "b"]


def test_survives_reopening_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    first = SQLiteJobStore(path)
    job = make_job("a", request_id="req")
    first.insert(job)
    job.state, job.attempts = JobState.RUNNING, 1
    first.update(job)
    first.insert(make_job("b"))
    first.close()

    second = SQLiteJobStore(path)
    try:
        assert second.get("a") == job
        assert [j.id for j in second.list(state=None, offset=0, limit=10)] == ["b", "a"]
        found = second.find_by_request_id("req")
        assert found is not None and found.id == "a"
        second.insert(make_job("c"))  # numbering continues after the old jobs
        assert [j.id for j in second.in_states(JobState.QUEUED)] == ["b", "c"]
    finally:
        second.close()


def test_a_full_database_is_reported_as_a_full_disk(store: SQLiteJobStore) -> None:
    """SQLite's SQLITE_FULL ("database or disk is full") comes out as OSError(ENOSPC), which
    the job manager reports as DISK_FULL; here the database is capped at its current size."""
    import errno

    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(OSError) as info:
        for i in range(1000):
            store.insert(make_job(f"j{i}"))
    assert info.value.errno == errno.ENOSPC
