"""tuneserve.jobs.manager with a fake trainer: the queue, cancellation, idempotency and
restart recovery. No model is loaded; the fake writes a file and reports progress."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tuneserve.data.rows import Row, write_snapshot
from tuneserve.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tuneserve.jobs.manager import JobManager, Limits, TrainRequest
from tuneserve.jobs.model import DatasetFormat, Job, JobSpec, JobState, Progress, TrainingSpec
from tuneserve.jobs.store import SQLiteJobStore
from tuneserve.registry import AdapterInfo, AdapterRegistry
from tuneserve.training.recipe import StopTraining

TIMEOUT = 10.0
ROWS = [{"prompt": "Q: hi", "response": " A: hello"}, {"prompt": "Q: bye", "response": " A: ciao"}]
WEIGHTS = b"fake adapter weights"


@dataclass
class FakeResult:
    final_loss: float
    steps: int
    trained_tokens: int
    target_modules: tuple[str, ...] = ("c_attn",)
    eval_loss: float | None = None
    samples: tuple[dict[str, str], ...] = ()


@dataclass
class FakeTrainer:
    """Has the Trainer signature. With `hold` set it waits after its first step until
    `release` is set or it is told to stop."""

    hold: bool = False
    error: Exception | None = None
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    calls: list[tuple[str, list[Row]]] = field(default_factory=list)

    def __call__(
        self,
        *,
        spec: JobSpec,
        rows: Sequence[Row],
        output_dir: Path,
        on_progress: Callable[[Progress], None],
        should_stop: Callable[[], bool],
        **more: Any,
    ) -> FakeResult:
        self.calls.append((spec.adapter_id, list(rows)))
        self.started.set()
        steps = 3
        for step in range(1, steps + 1):
            if should_stop():
                raise StopTraining
            on_progress(Progress(step=step, total_steps=steps, loss=1.0 / step))
            if step == 1 and self.hold:
                wait_until(lambda: self.release.is_set() or should_stop())
        if should_stop():
            raise StopTraining
        if self.error is not None:
            raise self.error
        (output_dir / "adapter_model.safetensors").write_bytes(WEIGHTS)
        return FakeResult(final_loss=1.0 / steps, steps=steps, trained_tokens=42)


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


@dataclass
class Env:
    tmp: Path
    store: SQLiteJobStore
    registry: AdapterRegistry
    trainer: FakeTrainer
    registered: list[AdapterInfo]
    managers: list[JobManager]

    def manager(self, limits: Limits | None = None, *, start: bool = False) -> JobManager:
        m = JobManager(
            store=self.store,
            registry=self.registry,
            trainer=self.trainer,
            base_model="tiny-base",
            datasets_dir=self.tmp / "datasets",
            limits=limits or Limits(),
            on_adapter_registered=self.registered.append,
        )
        self.managers.append(m)
        if start:
            m.start()
        return m


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(
        tmp=tmp_path,
        store=SQLiteJobStore(tmp_path / "jobs.sqlite3"),
        registry=AdapterRegistry(tmp_path / "adapters"),
        trainer=FakeTrainer(),
        registered=[],
        managers=[],
    )
    yield e
    e.trainer.release.set()
    for m in e.managers:
        m.stop(timeout=TIMEOUT)
    e.store.close()


def request(adapter_id: str = "", **kw: Any) -> TrainRequest:
    return TrainRequest(rows=kw.pop("rows", ROWS), adapter_id=adapter_id, **kw)


def wait_state(manager: JobManager, job_id: str, state: JobState) -> Job:
    wait_until(lambda: manager.get(job_id).state is state)
    return manager.get(job_id)


def test_submitted_job_is_queued_then_succeeds_with_its_adapter(env: Env) -> None:
    m = env.manager()
    job = m.submit(request("vader", training=TrainingSpec(epochs=1)))
    assert job.state is JobState.QUEUED
    assert job.queue_position == 0
    assert job.spec.adapter_id == "vader"
    assert job.spec.base_model == "tiny-base"
    assert job.spec.dataset_format is DatasetFormat.PROMPT_RESPONSE
    assert job.spec.dataset_rows == 2

    m.start()
    done = wait_state(m, job.id, JobState.SUCCEEDED)
    assert done.error is None
    assert done.attempts == 1
    assert done.finished_at is not None and done.started_at is not None
    assert env.trainer.calls == [("vader", ROWS)]  # trained on the snapshot of the rows

    adapter = env.registry.get("vader")
    assert adapter.source_job_id == job.id
    assert adapter.steps == 3
    assert adapter.trained_tokens == 42
    assert adapter.base_model == "tiny-base"
    assert (env.registry.path("vader") / "adapter_model.safetensors").read_bytes() == WEIGHTS
    wait_until(lambda: len(env.registered) == 1)
    assert env.registered[0].id == "vader"
    # Finished state is in the store, not only in memory.
    stored = env.store.get(job.id)
    assert stored is not None and stored.state is JobState.SUCCEEDED


def test_adapter_id_defaults_from_the_job_id(env: Env) -> None:
    job = env.manager().submit(request())
    assert job.spec.adapter_id == f"adapter-{job.id}"


def test_jobs_run_in_order_and_report_queue_positions(env: Env) -> None:
    m = env.manager()
    jobs = [m.submit(request(f"a{i}")) for i in range(3)]
    assert [j.queue_position for j in jobs] == [0, 1, 2]
    assert [m.get(j.id).queue_position for j in jobs] == [0, 1, 2]
    listed = {j.id: j.queue_position for j in m.list_jobs(state=None, offset=0, limit=10)}
    assert listed == {jobs[0].id: 0, jobs[1].id: 1, jobs[2].id: 2}

    m.cancel(jobs[0].id)
    assert m.get(jobs[1].id).queue_position == 0
    assert m.get(jobs[2].id).queue_position == 1

    m.start()
    wait_state(m, jobs[2].id, JobState.SUCCEEDED)
    wait_state(m, jobs[1].id, JobState.SUCCEEDED)
    assert [c[0] for c in env.trainer.calls] == ["a1", "a2"]


def test_running_job_is_position_zero_and_shows_live_progress(env: Env) -> None:
    env.trainer.hold = True
    m = env.manager(start=True)
    first, second = m.submit(request("a1")), m.submit(request("a2"))
    assert env.trainer.started.wait(TIMEOUT)
    running = wait_state(m, first.id, JobState.RUNNING)
    wait_until(lambda: m.get(first.id).progress.step == 1)
    assert running.queue_position == 0
    assert m.get(second.id).queue_position == 0  # next in line
    assert m.get(first.id).progress.total_steps == 3
    env.trainer.release.set()
    wait_state(m, second.id, JobState.SUCCEEDED)


def test_cancel_a_queued_job(env: Env) -> None:
    m = env.manager()
    job = m.submit(request("vader"))
    cancelled = m.cancel(job.id)
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.finished_at is not None
    with pytest.raises(FailedPrecondition):
        m.cancel(job.id)
    m.start()
    later = m.submit(request("other"))
    wait_state(m, later.id, JobState.SUCCEEDED)
    assert [c[0] for c in env.trainer.calls] == ["other"]  # the cancelled one never ran
    assert m.get(job.id).state is JobState.CANCELLED
    assert not env.registry.exists("vader")


def test_cancel_a_running_job(env: Env) -> None:
    env.trainer.hold = True
    m = env.manager(start=True)
    job = m.submit(request("vader"))
    nxt = m.submit(request("next"))
    assert env.trainer.started.wait(TIMEOUT)
    wait_state(m, job.id, JobState.RUNNING)

    m.cancel(job.id)
    done = wait_state(m, job.id, JobState.CANCELLED)
    assert done.error is None
    assert not env.registry.exists("vader")
    # The queue moves on; the next job is not cancelled by the flag of the last one.
    env.trainer.release.set()
    wait_state(m, nxt.id, JobState.SUCCEEDED)
    assert env.registry.exists("next")
    staging = env.registry.root / ".staging"
    wait_until(lambda: list(staging.iterdir()) == [])  # the partial adapter was removed
    stored = env.store.get(job.id)
    assert stored is not None and stored.state is JobState.CANCELLED


def test_cancel_unknown_job_is_not_found(env: Env) -> None:
    m = env.manager()
    with pytest.raises(NotFound):
        m.cancel("nope")
    with pytest.raises(NotFound) as info:
        m.get("nope")
    assert info.value.field == "job_id"


def test_same_request_id_returns_the_same_job(env: Env) -> None:
    m = env.manager()
    first = m.submit(request("vader", request_id="req-1"))
    again = m.submit(request("vader", request_id="req-1"))
    assert again.id == first.id
    assert len(m.list_jobs(state=None, offset=0, limit=10)) == 1
    other = m.submit(request("yoda", request_id="req-2"))
    assert other.id != first.id


def test_duplicate_adapter_id_is_rejected(env: Env) -> None:
    m = env.manager()
    first = m.submit(request("vader"))
    with pytest.raises(AlreadyExists) as info:
        m.submit(request("vader"))
    assert info.value.field == "adapter_id"
    m.start()
    wait_state(m, first.id, JobState.SUCCEEDED)
    with pytest.raises(AlreadyExists):  # now it is in the registry
        m.submit(request("vader"))
    assert len(m.list_jobs(state=None, offset=0, limit=10)) == 1


def test_cancelled_job_frees_its_adapter_id(env: Env) -> None:
    m = env.manager()
    job = m.submit(request("vader"))
    m.cancel(job.id)
    assert m.submit(request("vader")).state is JobState.QUEUED


def test_invalid_requests_are_rejected_before_queueing(env: Env) -> None:
    m = env.manager()
    with pytest.raises(InvalidArgument) as info:
        m.submit(TrainRequest(rows=ROWS, dataset_path="/x.jsonl"))
    assert info.value.field == "dataset"
    with pytest.raises(InvalidArgument):
        m.submit(TrainRequest(adapter_id="x"))
    with pytest.raises(InvalidArgument) as info:
        m.submit(request("Bad/Id"))
    assert info.value.field == "adapter_id"
    with pytest.raises(InvalidArgument) as info:
        m.submit(request(rows=[{"prompt": "q"}]))
    assert info.value.field == "dataset.inline.rows[0].response"
    assert m.list_jobs(state=None, offset=0, limit=10) == []


def test_dataset_file_under_a_root_is_snapshotted(env: Env) -> None:
    root = (env.tmp / "data").resolve()
    root.mkdir()
    path = root / "rows.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    m = env.manager(Limits(dataset_roots=(root,)))
    job = m.submit(TrainRequest(dataset_path=str(path), adapter_id="from-file"))
    assert job.spec.dataset_format is DatasetFormat.TEXT
    path.write_text('{"text": "changed after submit"}\n')
    m.start()
    wait_state(m, job.id, JobState.SUCCEEDED)
    assert env.trainer.calls == [("from-file", [{"text": "one"}, {"text": "two"}])]


def test_interrupted_running_job_is_requeued_on_start(env: Env) -> None:
    old = JobSpec(
        base_model="tiny-base",
        adapter_id="interrupted",
        dataset_format=DatasetFormat.PROMPT_RESPONSE,
        dataset_rows=2,
    ).validate()
    queued = JobSpec(**{**old.__dict__, "adapter_id": "queued-after"})
    write_snapshot(ROWS, env.tmp / "datasets" / "j-run.jsonl")
    write_snapshot(ROWS, env.tmp / "datasets" / "j-q.jsonl")
    env.store.insert(
        Job(id="j-run", spec=old, state=JobState.RUNNING, attempts=1, progress=Progress(step=2))
    )
    env.store.insert(Job(id="j-q", spec=queued, state=JobState.QUEUED))

    m = env.manager(Limits(max_job_attempts=3), start=True)
    done = wait_state(m, "j-run", JobState.SUCCEEDED)
    wait_state(m, "j-q", JobState.SUCCEEDED)
    assert done.attempts == 2
    assert env.registry.exists("interrupted")
    # Oldest first: the interrupted job keeps its place ahead of the later one.
    assert [c[0] for c in env.trainer.calls] == ["interrupted", "queued-after"]


def test_job_interrupted_too_often_fails_instead_of_running(env: Env) -> None:
    spec = JobSpec(
        base_model="tiny-base",
        adapter_id="crashy",
        dataset_format=DatasetFormat.TEXT,
        dataset_rows=1,
    ).validate()
    write_snapshot([{"text": "x"}], env.tmp / "datasets" / "j1.jsonl")
    env.store.insert(Job(id="j1", spec=spec, state=JobState.RUNNING, attempts=3))

    m = env.manager(Limits(max_job_attempts=3), start=True)
    failed = wait_state(m, "j1", JobState.FAILED)
    assert failed.error is not None
    assert failed.error.code == "INTERRUPTED"
    assert "3 times" in failed.error.message
    assert failed.finished_at is not None
    later = m.submit(request("later"))
    wait_state(m, later.id, JobState.SUCCEEDED)
    assert [c[0] for c in env.trainer.calls] == ["later"]


def test_stop_during_a_run_puts_the_job_back_in_the_queue(env: Env) -> None:
    env.trainer.hold = True
    m = env.manager(start=True)
    job = m.submit(request("vader"))
    assert env.trainer.started.wait(TIMEOUT)
    wait_until(lambda: m.get(job.id).progress.step == 1)

    m.stop(timeout=TIMEOUT)
    stored = env.store.get(job.id)
    assert stored is not None
    assert stored.state is JobState.QUEUED
    assert stored.attempts == 0  # a graceful stop does not count as an attempt
    assert stored.progress.step == 0
    assert not env.registry.exists("vader")
    with pytest.raises(FailedPrecondition):
        m.submit(request("too-late"))

    # The next process picks it up and finishes it.
    env.trainer.hold = False
    m2 = env.manager(start=True)
    done = wait_state(m2, job.id, JobState.SUCCEEDED)
    assert done.attempts == 1
    assert env.registry.exists("vader")


def test_stop_accepting_rejects_new_jobs(env: Env) -> None:
    m = env.manager()
    m.stop_accepting()
    with pytest.raises(FailedPrecondition):
        m.submit(request("x"))


def test_trainer_exception_fails_the_job_with_its_message(env: Env) -> None:
    env.trainer.error = RuntimeError("CUDA out of memory")
    m = env.manager(start=True)
    job = m.submit(request("vader"))
    failed = wait_state(m, job.id, JobState.FAILED)
    assert failed.error is not None
    assert failed.error.code == "TRAINING_FAILED"
    assert "CUDA out of memory" in failed.error.message
    assert "RuntimeError" in failed.error.message
    assert not env.registry.exists("vader")
    staging = env.registry.root / ".staging"
    wait_until(lambda: list(staging.iterdir()) == [])  # the partial adapter is removed
    # The worker survives and runs the next job.
    env.trainer.error = None
    nxt = m.submit(request("yoda"))
    wait_state(m, nxt.id, JobState.SUCCEEDED)


def test_trainer_invalid_argument_fails_as_invalid_dataset(env: Env) -> None:
    env.trainer.error = InvalidArgument("no tokens fit", field="training.max_seq_length", row=1)
    m = env.manager(start=True)
    job = m.submit(request("vader"))
    failed = wait_state(m, job.id, JobState.FAILED)
    assert failed.error is not None
    assert failed.error.code == "INVALID_DATASET"
    assert failed.error.field == "training.max_seq_length"
    assert failed.error.row == 1


class BarrierStore:
    """Delegates to a real store, but makes two submits look up their request id at the
    same moment, as two concurrent retries of one TrainJob call would. If the lookups are
    serialised (the fix), the first gives up waiting for the second and goes on."""

    def __init__(self, inner: SQLiteJobStore) -> None:
        self._inner = inner
        self._barrier = threading.Barrier(2, timeout=0.5)

    def find_by_request_id(self, request_id: str) -> Job | None:
        found = self._inner.find_by_request_id(request_id)
        with contextlib.suppress(threading.BrokenBarrierError):
            self._barrier.wait()
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.parametrize("adapter_id", ["vader", ""])
def test_concurrent_submits_with_one_request_id_get_the_same_job(env: Env, adapter_id: str) -> None:
    m = JobManager(
        store=BarrierStore(env.store),
        registry=env.registry,
        trainer=env.trainer,
        base_model="tiny-base",
        datasets_dir=env.tmp / "datasets",
        limits=Limits(),
    )
    results: list[Any] = [None, None]

    def submit(i: int) -> None:
        try:
            results[i] = m.submit(request(adapter_id, request_id="req-1"))
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert all(isinstance(r, Job) for r in results), results
    assert results[0].id == results[1].id
