"""tuneserve.jobs.manager and tuneserve.jobs.worker with a fake trainer, wired as app.py
wires them: one SQLite job store, a local artifact store, the adapter registry indexing in
the store, a Worker that claims jobs from it and a JobManager in front. The queue,
cancellation, idempotency, restart recovery, leases and fencing across replicas (two
stores opened on one database stand for two replicas). No model is loaded; the fake writes
a file, reports progress and commits a checkpoint."""

from __future__ import annotations

import contextlib
import errno
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from tuneserve.data.rows import Row, read_snapshot, write_snapshot
from tuneserve.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from tuneserve.jobs import worker as worker_module
from tuneserve.jobs.manager import JobManager, Limits, TrainRequest
from tuneserve.jobs.model import (
    DatasetFormat,
    Job,
    JobSpec,
    JobState,
    LoraSpec,
    Progress,
    Task,
    TrainingSpec,
)
from tuneserve.jobs.store import JobStore, LossPoint
from tuneserve.jobs.store_sqlite import SQLiteJobStore
from tuneserve.jobs.worker import Worker, checkpoint_prefix, dataset_key
from tuneserve.registry import AdapterInfo, AdapterRegistry
from tuneserve.storage.artifacts import LocalArtifactStore
from tuneserve.storage.cache import ArtifactCache
from tuneserve.training.recipe import StopTraining

TIMEOUT = 10.0
LEASE_S = 30.0  # heartbeats every 10 s: tests that need them sooner say so
ROWS = [{"prompt": "Q: hi", "response": " A: hello"}, {"prompt": "Q: bye", "response": " A: ciao"}]
WEIGHTS = b"fake adapter weights"
CHECKPOINT_FILE = "state.bin"


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
    """Has the Trainer signature. Three steps; after step 1 it writes a checkpoint into its
    checkpoint_dir and commits it by `on_checkpoint`, as the real one does. With `hold` set
    it waits after step `hold_step` until `release` is set or it is told to stop."""

    hold: bool = False
    hold_step: int = 1
    error: Exception | None = None
    weights: bytes = WEIGHTS
    started: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    calls: list[tuple[str, list[Row]]] = field(default_factory=list)
    more: list[dict[str, Any]] = field(default_factory=list)  # the other keyword arguments
    threads: list[threading.Thread] = field(default_factory=list)  # where each call ran
    # Each call's checkpoint_dir as the call found it: relative path -> bytes.
    found: list[dict[str, bytes]] = field(default_factory=list)

    def __call__(
        self,
        *,
        spec: JobSpec,
        rows: Sequence[Row],
        output_dir: Path,
        on_progress: Callable[[Progress], None],
        should_stop: Callable[[], bool],
        checkpoint_dir: Path | None,
        on_checkpoint: Callable[[Path], None],
        **more: Any,
    ) -> FakeResult:
        self.calls.append((spec.adapter_id, list(rows)))
        self.more.append({**more, "checkpoint_dir": checkpoint_dir})
        self.threads.append(threading.current_thread())
        assert checkpoint_dir is not None
        self.found.append(
            {
                p.relative_to(checkpoint_dir).as_posix(): p.read_bytes()
                for p in sorted(checkpoint_dir.rglob("*"))
                if p.is_file()
            }
        )
        self.started.set()
        steps = 3
        for step in range(1, steps + 1):
            if should_stop():
                raise StopTraining
            on_progress(Progress(step=step, total_steps=steps, loss=1.0 / step))
            if step == 1:
                written = checkpoint_dir / "step-00000001"
                written.mkdir(exist_ok=True)
                (written / CHECKPOINT_FILE).write_bytes(b"checkpoint at 1")
                on_checkpoint(written)
            if step == self.hold_step and self.hold:
                self.held.set()
                wait_until(lambda: self.release.is_set() or should_stop())
        if should_stop():
            raise StopTraining
        if self.error is not None:
            raise self.error
        (output_dir / "adapter_model.safetensors").write_bytes(self.weights)
        return FakeResult(final_loss=1.0 / steps, steps=steps, trained_tokens=42)


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


@dataclass
class Env:
    """The shared parts (the job store's database, the artifact store) and the replicas
    made on them. `store` and `registry` are the first replica's."""

    tmp: Path
    store: SQLiteJobStore
    artifacts: LocalArtifactStore
    registry: AdapterRegistry
    trainer: FakeTrainer
    registered: list[AdapterInfo]
    managers: list[JobManager] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    trainers: list[FakeTrainer] = field(default_factory=list)
    stores: list[JobStore] = field(default_factory=list)

    def open_store(self) -> SQLiteJobStore:
        """Another replica's connection to the one database."""
        store = SQLiteJobStore(self.tmp / "jobs.sqlite3")
        self.stores.append(store)
        return store

    def open_registry(self, store: JobStore, name: str) -> AdapterRegistry:
        """A replica's registry: the shared index and artifact store, its own cache and
        staging directory."""
        return AdapterRegistry(
            index=store,
            artifacts=self.artifacts,
            cache=ArtifactCache(self.artifacts, self.tmp / f"cache-{name}", max_bytes=1 << 30),
            staging_root=self.tmp / f"staging-{name}",
        )

    def worker(
        self,
        *,
        store: JobStore | None = None,
        registry: AdapterRegistry | None = None,
        trainer: Any = None,
        worker_id: str = "test",
        lease_s: float = LEASE_S,
        max_job_attempts: int = 3,
    ) -> Worker:
        w = Worker(
            store=store or self.store,
            registry=registry or self.registry,
            artifacts=self.artifacts,
            trainer=trainer or self.trainer,
            work_dir=self.tmp / "work" / f"{worker_id}-{len(self.workers)}",
            worker_id=worker_id,
            lease_s=lease_s,
            max_job_attempts=max_job_attempts,
            on_adapter_registered=self.registered.append,
        )
        self.workers.append(w)
        return w

    def manager(
        self,
        limits: Limits | None = None,
        *,
        start: bool = False,
        trains: bool = True,
        store: JobStore | None = None,
        registry: AdapterRegistry | None = None,
        trainer: Any = None,
        worker_id: str = "test",
        lease_s: float = LEASE_S,
        **more: Any,
    ) -> JobManager:
        """A replica's JobManager; `trains` False: its role only serves (no worker)."""
        limits = limits or Limits()
        store = store or self.store
        registry = registry or self.registry
        worker = None
        if trains:
            worker = self.worker(
                store=store,
                registry=registry,
                trainer=trainer,
                worker_id=worker_id,
                lease_s=lease_s,
                max_job_attempts=limits.max_job_attempts,
            )
        m = JobManager(
            store=store,
            registry=registry,
            artifacts=self.artifacts,
            worker=worker,
            base_model="tiny-base",
            limits=limits,
            **more,
        )
        self.managers.append(m)
        if start:
            m.start()
        return m

    def replica(
        self, name: str, *, trainer: FakeTrainer | None = None, **kw: Any
    ) -> tuple[JobManager, AdapterRegistry]:
        """Another replica: its own connection to the database, registry and worker id."""
        store = self.open_store()
        registry = self.open_registry(store, name)
        if trainer is not None:
            self.trainers.append(trainer)
        m = self.manager(store=store, registry=registry, trainer=trainer, worker_id=name, **kw)
        return m, registry


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle worker polls the store every second; tests need not wait that long."""
    monkeypatch.setattr(worker_module, "IDLE_POLL_S", 0.05)
    monkeypatch.setattr(worker_module, "RETRY_S", 0.05)


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Env]:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    e = Env(
        tmp=tmp_path,
        store=store,
        artifacts=artifacts,
        registry=AdapterRegistry(
            index=store,
            artifacts=artifacts,
            cache=ArtifactCache(artifacts, tmp_path / "cache", max_bytes=1 << 30),
            staging_root=tmp_path / "staging",
        ),
        trainer=FakeTrainer(),
        registered=[],
    )
    e.trainers.append(e.trainer)
    yield e
    for trainer in e.trainers:
        trainer.release.set()
    for m in e.managers:
        m.stop(timeout=TIMEOUT)
    for w in e.workers:  # those made without a manager
        w.stop(timeout=TIMEOUT)
    for s in e.stores:
        s.close()
    e.store.close()


def request(adapter_id: str = "", **kw: Any) -> TrainRequest:
    return TrainRequest(rows=kw.pop("rows", ROWS), adapter_id=adapter_id, **kw)


def wait_state(manager: JobManager, job_id: str, state: JobState) -> Job:
    wait_until(lambda: manager.get(job_id).state is state)
    return manager.get(job_id)


def put_snapshot(env: Env, job_id: str, rows: list[Row]) -> None:
    """A dataset snapshot in the artifact store, as JobManager.submit leaves it."""
    with tempfile.TemporaryDirectory() as tmp:
        write_snapshot(rows, Path(tmp) / worker_module.TRAIN_FILE)
        env.artifacts.put_dir(dataset_key(job_id), Path(tmp))


def spec_of(adapter_id: str, rows: int = 2, form: DatasetFormat | None = None) -> JobSpec:
    return JobSpec(
        base_model="tiny-base",
        adapter_id=adapter_id,
        dataset_format=form or DatasetFormat.PROMPT_RESPONSE,
        dataset_rows=rows,
    ).validate()


def insert_running(
    env: Env,
    job_id: str,
    adapter_id: str,
    *,
    worker: str = "test",
    lease_s: float = 3600.0,
    **job: Any,
) -> Job:
    """A job a replica that died claimed (`worker`, its lease for `lease_s`), with its
    dataset snapshot; returns the claim."""
    put_snapshot(env, job_id, ROWS)
    env.store.insert(Job(id=job_id, spec=spec_of(adapter_id), **job))
    claimed = env.store.claim(worker, lease_s)
    assert claimed is not None and claimed.id == job_id
    return claimed


def adapter_versions(env: Env, adapter_id: str) -> list[str]:
    """The versions under an adapter's key prefix in the artifact store."""
    directory = env.artifacts.root / "adapters" / adapter_id
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_submitted_job_is_queued_then_succeeds_with_its_adapter(env: Env) -> None:
    m = env.manager()
    job = m.submit(request("vader", training=TrainingSpec(epochs=1)))
    assert job.state is JobState.QUEUED
    assert job.queue_position == 0
    assert job.spec.adapter_id == "vader"
    assert job.spec.base_model == "tiny-base"
    assert job.spec.dataset_format is DatasetFormat.PROMPT_RESPONSE
    assert job.spec.dataset_rows == 2
    # The validated rows are kept in the artifact store, where any replica finds them.
    snapshot = env.artifacts.local_path(dataset_key(job.id))
    assert snapshot is not None
    assert read_snapshot(snapshot / worker_module.TRAIN_FILE) == ROWS

    m.start()
    done = wait_state(m, job.id, JobState.SUCCEEDED)
    assert done.error is None
    assert (done.attempts, done.fence) == (1, 1)
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
    # Finished state is in the store, not only in memory; so is the adapter's index row.
    stored = env.store.get(job.id)
    assert stored is not None and stored.state is JobState.SUCCEEDED
    record = env.store.get_adapter("vader")
    assert record is not None and record.source_job_id == job.id
    assert env.registry.path("vader") == env.artifacts.local_path(record.key)
    assert adapter_versions(env, "vader") == [record.version]


def test_each_job_runs_on_a_thread_of_its_own_that_ends_with_it(env: Env) -> None:
    # A long-lived thread that ran torch keeps an OpenMP team that slows decoding for good
    # (tuneserve.torch_threads).
    m = env.manager(start=True)
    jobs = [m.submit(request(f"t{i}")) for i in range(2)]
    for job in jobs:
        wait_state(m, job.id, JobState.SUCCEEDED)
    first, second = env.trainer.threads
    assert first is not second
    assert [t.name for t in env.trainer.threads] == [f"job-{j.id}" for j in jobs]
    wait_until(lambda: not first.is_alive() and not second.is_alive())


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
    staging = env.registry.staging_root
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


@pytest.mark.parametrize(
    ("dead", "lease_s"),
    [("test", 3600.0), ("gone", 0.0)],
    ids=["this-replica-restarted", "another-replicas-lease-expired"],
)
def test_a_running_job_whose_worker_died_is_claimed_again(
    env: Env, dead: str, lease_s: float
) -> None:
    """Left RUNNING by a process that died: this replica restarted under the same id (its
    old leases are void at once), or another replica whose lease has run out."""
    insert_running(env, "j-run", "interrupted", worker=dead, lease_s=lease_s)
    put_snapshot(env, "j-q", ROWS)
    env.store.insert(Job(id="j-q", spec=spec_of("queued-after")))

    m = env.manager(Limits(max_job_attempts=3), start=True)
    done = wait_state(m, "j-run", JobState.SUCCEEDED)
    wait_state(m, "j-q", JobState.SUCCEEDED)
    assert (done.attempts, done.fence) == (2, 2)
    assert env.registry.exists("interrupted")
    # Oldest first: the interrupted job keeps its place ahead of the later one.
    assert [c[0] for c in env.trainer.calls] == ["interrupted", "queued-after"]


def test_a_job_under_another_replicas_live_lease_is_left_to_it(env: Env) -> None:
    insert_running(env, "j-run", "theirs", worker="other", lease_s=3600.0)
    m = env.manager(start=True)
    later = m.submit(request("mine"))
    wait_state(m, later.id, JobState.SUCCEEDED)
    time.sleep(0.2)  # a few more polls
    assert [c[0] for c in env.trainer.calls] == ["mine"]
    running = m.get("j-run")
    assert (running.state, running.fence) == (JobState.RUNNING, 1)
    # Once its lease is gone (that replica restarted), it is this one's to resume.
    assert env.store.expire_leases("other") == 1
    assert wait_state(m, "j-run", JobState.SUCCEEDED).fence == 2


def test_job_interrupted_too_often_fails_instead_of_running(env: Env) -> None:
    put_snapshot(env, "j1", [{"text": "x"}])
    env.store.insert(Job(id="j1", spec=spec_of("crashy", 1, DatasetFormat.TEXT)))
    for attempt in (1, 2, 3):  # three replicas claimed it and died
        time.sleep(0.01)
        claimed = env.store.claim("gone", 0.0)
        assert claimed is not None and (claimed.id, claimed.attempts) == ("j1", attempt)
    time.sleep(0.01)

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
    staging = env.registry.staging_root
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
    m = env.manager(store=cast(JobStore, BarrierStore(env.store)), trains=False)
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


# --- validation rows: given, or a fraction held out

TEXT_ROWS = [{"text": f"row {i}"} for i in range(10)]


def run_to_success(m: JobManager, req: TrainRequest) -> Job:
    job = m.submit(req)
    return wait_state(m, job.id, JobState.SUCCEEDED)


def test_eval_fraction_holds_out_rows_that_the_trainer_gets_as_validation(env: Env) -> None:
    m = env.manager(start=True)
    job = run_to_success(
        m, request("held", rows=TEXT_ROWS, training=TrainingSpec(eval_fraction=0.3, seed=5))
    )
    assert job.spec.dataset_rows == 7
    assert job.spec.validation_rows == 3
    [(_, trained)] = env.trainer.calls
    validation = env.trainer.more[0]["validation_rows"]
    assert len(trained) == 7 and len(validation) == 3
    # Held out, not copied: every row is in exactly one split, in its original order.
    assert sorted(r["text"] for r in trained + validation) == sorted(r["text"] for r in TEXT_ROWS)
    assert trained == [r for r in TEXT_ROWS if r in trained]
    assert validation == [r for r in TEXT_ROWS if r in validation]


def test_eval_fraction_split_is_deterministic_by_seed(env: Env) -> None:
    m = env.manager(start=True)
    held = {}
    for adapter_id, seed in (("a", 5), ("b", 5), ("c", 6)):
        run_to_success(
            m,
            request(
                adapter_id, rows=TEXT_ROWS, training=TrainingSpec(eval_fraction=0.3, seed=seed)
            ),
        )
    for (adapter_id, _), more in zip(env.trainer.calls, env.trainer.more, strict=True):
        held[adapter_id] = [r["text"] for r in more["validation_rows"]]
    assert held["a"] == held["b"]
    assert held["a"] != held["c"]


@pytest.mark.parametrize(("n", "fraction", "held"), [(10, 0.01, 1), (10, 0.25, 2), (20, 0.5, 10)])
def test_eval_fraction_holds_out_a_rounded_share_and_at_least_one(
    env: Env, n: int, fraction: float, held: int
) -> None:
    rows = [{"text": f"row {i}"} for i in range(n)]
    job = env.manager().submit(request(rows=rows, training=TrainingSpec(eval_fraction=fraction)))
    assert (job.spec.dataset_rows, job.spec.validation_rows) == (n - held, held)


@pytest.mark.parametrize(("n", "fraction"), [(1, 0.1), (2, 0.9)])
def test_eval_fraction_that_leaves_nothing_to_train_is_rejected(
    env: Env, n: int, fraction: float
) -> None:
    m = env.manager()
    rows = [{"text": f"row {i}"} for i in range(n)]
    with pytest.raises(InvalidArgument) as info:
        m.submit(request(rows=rows, training=TrainingSpec(eval_fraction=fraction)))
    assert info.value.field == "training.eval_fraction"
    assert "none to train on" in info.value.message
    assert m.list_jobs(state=None, offset=0, limit=10) == []


def test_without_validation_the_trainer_gets_none(env: Env) -> None:
    m = env.manager(start=True)
    job = run_to_success(m, request("plain"))
    assert job.spec.validation_rows == 0
    assert env.trainer.more[0]["validation_rows"] == []
    assert env.trainer.more[0]["parent_adapter_dir"] is None
    # A fresh checkpoint directory of its own, under the worker's work directory.
    checkpoints = env.trainer.more[0]["checkpoint_dir"]
    assert checkpoints.is_relative_to(env.tmp / "work")
    assert env.trainer.found == [{}]  # nothing to resume from


def test_given_validation_rows_reach_the_trainer_and_nothing_is_held_out(env: Env) -> None:
    validation = [{"prompt": "Q: why", "response": " A: because"}]
    m = env.manager(start=True)
    job = run_to_success(
        m,
        request(
            "given",
            validation_rows=validation,
            training=TrainingSpec(eval_fraction=0.5),  # ignored: a validation set was given
        ),
    )
    assert (job.spec.dataset_rows, job.spec.validation_rows) == (2, 1)
    assert env.trainer.calls == [("given", ROWS)]
    assert env.trainer.more[0]["validation_rows"] == validation


def test_validation_rows_of_another_form_are_rejected(env: Env) -> None:
    m = env.manager()
    with pytest.raises(InvalidArgument) as info:
        m.submit(request(validation_rows=[{"text": "plain text"}]))
    assert info.value.field == "validation.inline.rows"
    assert "text rows" in info.value.message and "prompt_response" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        m.submit(request(validation_rows=[{"prompt": "q"}]))
    assert info.value.field == "validation.inline.rows[0].response"
    assert m.list_jobs(state=None, offset=0, limit=10) == []


# --- sequence classification

LABELLED = [
    {"text": "I am fine", "label": "pos"},
    {"text": "It is noon", "label": 1},
    {"text": "The lazy dog", "label": "neg"},
]
CLS = Task.CLASSIFICATION


def test_classification_labels_default_to_the_sorted_distinct_row_labels(env: Env) -> None:
    m = env.manager(start=True)
    job = m.submit(request("cls", rows=LABELLED, task=CLS))
    assert job.spec.task is CLS
    assert job.spec.dataset_format is DatasetFormat.LABELLED
    assert job.spec.labels == ("1", "neg", "pos")
    wait_state(m, job.id, JobState.SUCCEEDED)
    assert [r["label"] for r in env.trainer.calls[0][1]] == ["pos", "1", "neg"]
    adapter = env.registry.get("cls")
    assert adapter.task == "classification"
    assert adapter.labels == ("1", "neg", "pos")


def test_classification_keeps_the_label_order_given(env: Env) -> None:
    job = env.manager().submit(request(rows=LABELLED, task=CLS, labels=("pos", "neg", "1")))
    assert job.spec.labels == ("pos", "neg", "1")


def test_unknown_label_in_validation_rows_names_the_row(env: Env) -> None:
    m = env.manager()
    validation = [{"text": "good", "label": "pos"}, {"text": "unsure", "label": "maybe"}]
    with pytest.raises(InvalidArgument) as info:
        m.submit(request(rows=LABELLED, task=CLS, validation_rows=validation))
    assert info.value.row == 1
    assert info.value.field.startswith("validation")
    assert info.value.field.endswith("rows[1].label")
    assert "'maybe'" in info.value.message
    assert m.list_jobs(state=None, offset=0, limit=10) == []


def test_unknown_label_in_training_rows_names_the_row(env: Env) -> None:
    with pytest.raises(InvalidArgument) as info:
        env.manager().submit(request(rows=LABELLED, task=CLS, labels=("pos", "neg")))
    assert info.value.row == 1
    assert info.value.field.startswith("dataset")
    assert info.value.field.endswith("rows[1].label")


def test_unknown_label_with_eval_fraction_names_the_users_row(env: Env) -> None:
    rows = [{"text": f"row {i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]
    rows[9] = {"text": "row 9", "label": "maybe"}
    with pytest.raises(InvalidArgument) as info:
        env.manager().submit(
            request(
                rows=rows,
                task=CLS,
                labels=("neg", "pos"),
                training=TrainingSpec(eval_fraction=0.2, seed=0),
            )
        )
    assert info.value.row == 9
    assert info.value.field.startswith("dataset")
    assert info.value.field.endswith("rows[9].label")


def test_labelled_rows_need_the_classification_task(env: Env) -> None:
    with pytest.raises(InvalidArgument) as info:
        env.manager().submit(request(rows=LABELLED))
    assert info.value.field == "task"


def test_classification_needs_labelled_rows(env: Env) -> None:
    with pytest.raises(InvalidArgument) as info:
        env.manager().submit(request(task=CLS))
    assert info.value.field == "dataset"


@pytest.mark.parametrize(
    ("rows", "labels"),
    [
        ([{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}], ()),
        (LABELLED, ("pos", "neg", "pos", "1")),
    ],
)
def test_classification_needs_two_distinct_labels(
    env: Env, rows: list[dict[str, Any]], labels: tuple[str, ...]
) -> None:
    m = env.manager()
    with pytest.raises(InvalidArgument) as info:
        m.submit(request(rows=rows, task=CLS, labels=labels))
    assert info.value.field == "labels"
    assert m.list_jobs(state=None, offset=0, limit=10) == []


# --- continuing a parent adapter


def register_parent(env: Env, adapter_id: str = "parent", **kw: Any) -> AdapterInfo:
    staging = env.registry.staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(WEIGHTS)
    fields: dict[str, Any] = {
        "base_model": "tiny-base",
        "r": 4,
        "alpha": 16.0,
        "dropout": 0.1,
        "target_modules": ("c_attn", "c_proj"),
        "source_job_id": "old-job",
        "final_loss": 0.5,
        "steps": 3,
        "trained_tokens": 10,
        **kw,
    }
    return env.registry.register(staging, AdapterInfo(id=adapter_id, **fields))


def test_unknown_parent_is_not_found(env: Env) -> None:
    m = env.manager()
    with pytest.raises(NotFound) as info:
        m.submit(request("child", parent_adapter_id="nobody"))
    assert info.value.field == "parent_adapter_id"
    assert m.list_jobs(state=None, offset=0, limit=10) == []


@pytest.mark.parametrize(
    "parent_kw", [{"base_model": "other-base"}, {"task": "classification", "labels": ("a", "b")}]
)
def test_parent_for_another_base_model_or_task_is_refused(
    env: Env, parent_kw: dict[str, Any]
) -> None:
    register_parent(env, **parent_kw)
    with pytest.raises(FailedPrecondition) as info:
        env.manager().submit(request("child", parent_adapter_id="parent"))
    assert info.value.field == "parent_adapter_id"


def test_child_refuses_lora_settings_that_differ_from_the_parents(env: Env) -> None:
    register_parent(env)
    m = env.manager()
    with pytest.raises(FailedPrecondition) as info:
        m.submit(
            request(
                "child",
                parent_adapter_id="parent",
                lora=LoraSpec(r=32),
                lora_given=frozenset({"r"}),
            )
        )
    assert info.value.field == "lora.r"
    assert "4" in info.value.message  # the parent's rank, so the caller knows what to give
    # The parent's own values, given explicitly, are fine (target_modules in any order).
    job = m.submit(
        request(
            "child",
            parent_adapter_id="parent",
            lora=LoraSpec(r=4, alpha=16.0, target_modules=("c_proj", "c_attn")),
            lora_given=frozenset({"r", "alpha", "target_modules"}),
        )
    )
    assert job.spec.lora.r == 4


def test_child_takes_unset_training_settings_from_the_parents_job(env: Env) -> None:
    m = env.manager(start=True)
    parent_training = TrainingSpec(epochs=7, learning_rate=0.01, batch_size=2, scheduler="cosine")
    first = m.submit(request("parent", training=parent_training))
    wait_state(m, first.id, JobState.SUCCEEDED)
    child = m.submit(
        request(
            "child",
            parent_adapter_id="parent",
            training=TrainingSpec(batch_size=4),  # given; the rest left unset
            training_given=frozenset({"batch_size"}),
        )
    )
    assert child.spec.training.epochs == 7
    assert child.spec.training.learning_rate == 0.01
    assert child.spec.training.scheduler == "cosine"
    assert child.spec.training.batch_size == 4


def test_child_takes_the_parents_lora_shape_and_directory(env: Env) -> None:
    register_parent(env)
    m = env.manager(start=True)
    job = m.submit(request("child", parent_adapter_id="parent"))
    assert job.spec.lora.r == 4
    assert job.spec.lora.alpha == 16.0
    assert job.spec.lora.dropout == 0.1
    assert job.spec.lora.target_modules == ("c_attn", "c_proj")
    wait_state(m, job.id, JobState.SUCCEEDED)
    assert env.trainer.more[0]["parent_adapter_dir"] == env.registry.path("parent")
    child = env.registry.get("child")
    assert child.parent_adapter_id == "parent"
    assert (child.r, child.alpha) == (4, 16.0)


def test_classification_child_keeps_the_parents_labels(env: Env) -> None:
    register_parent(env, task="classification", labels=("pos", "neg", "1"))
    job = env.manager().submit(
        request(
            "child", rows=LABELLED, task=CLS, labels=("1", "neg", "pos"), parent_adapter_id="parent"
        )
    )
    assert job.spec.labels == ("pos", "neg", "1")  # the head's order cannot change


# --- chat rows

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_chat_rows_need_a_template(env: Env) -> None:
    m = env.manager(base_chat_template=lambda: None)
    with pytest.raises(InvalidArgument) as info:
        m.submit(request(rows=CHAT_ROWS))
    assert info.value.field == "chat_template"
    assert m.list_jobs(state=None, offset=0, limit=10) == []
    job = m.submit(request("own", rows=CHAT_ROWS, chat_template=TEMPLATE))
    assert job.spec.dataset_format is DatasetFormat.CHAT
    assert job.spec.chat_template == TEMPLATE


def test_chat_rows_may_use_the_base_tokenizers_template(env: Env) -> None:
    m = env.manager(base_chat_template=lambda: TEMPLATE, start=True)
    job = run_to_success(m, request("base-template", rows=CHAT_ROWS))
    assert job.spec.chat_template == ""  # the trainer falls back to the tokenizer's
    assert env.trainer.calls == [("base-template", CHAT_ROWS)]


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m['content'] }}",  # unclosed block: does not compile
        "{{ messages[0]['content'] | no_such_filter }}",
        "{{ messages[9]['content'] }}",  # fails when rendered
    ],
)
def test_chat_template_that_does_not_render_is_rejected(env: Env, template: str) -> None:
    m = env.manager(base_chat_template=lambda: TEMPLATE)
    with pytest.raises(InvalidArgument) as info:
        m.submit(request(rows=CHAT_ROWS, chat_template=template))
    assert info.value.field == "chat_template"
    assert "does not render" in info.value.message
    assert m.list_jobs(state=None, offset=0, limit=10) == []


def test_chat_template_accepted_by_transformers_is_accepted(env: Env) -> None:
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    job = env.manager().submit(request(rows=CHAT_ROWS, chat_template=template))
    assert job.spec.chat_template == template


# --- resumable checkpoints, in the artifact store


def checkpoint_key(job: Job, fence: int) -> str:
    return f"{checkpoint_prefix(job.id)}/{fence}-00000001"


def wait_checkpoints_gone(env: Env, job_id: str) -> None:
    """An ended job's checkpoints are deleted just after its end is committed."""
    wait_until(lambda: not (env.artifacts.root / checkpoint_prefix(job_id)).exists())


def test_a_committed_checkpoint_lands_in_the_artifact_store_and_the_job_names_it(
    env: Env,
) -> None:
    env.trainer.hold = True
    m = env.manager(start=True)
    job = m.submit(request("vader"))
    assert env.trainer.held.wait(TIMEOUT)
    stored = env.store.get(job.id)
    assert stored is not None and stored.checkpoint == checkpoint_key(job, 1)
    files = env.artifacts.local_path(stored.checkpoint)
    assert files is not None
    assert (files / CHECKPOINT_FILE).read_bytes() == b"checkpoint at 1"
    env.trainer.release.set()
    wait_state(m, job.id, JobState.SUCCEEDED)


def test_a_finished_job_leaves_no_checkpoint_behind(env: Env) -> None:
    m = env.manager(start=True)
    job = m.submit(request("vader"))
    wait_state(m, job.id, JobState.SUCCEEDED)
    checkpoints = env.trainer.more[0]["checkpoint_dir"]
    assert checkpoints.name == "checkpoints" and checkpoints.parent.name == f"{job.id}-1"
    wait_until(lambda: not checkpoints.parent.exists())  # the worker's copy
    wait_checkpoints_gone(env, job.id)  # a finished job never resumes


@pytest.mark.parametrize("outcome", [JobState.FAILED, JobState.CANCELLED])
def test_checkpoints_of_a_failed_or_cancelled_job_are_removed(env: Env, outcome: JobState) -> None:
    env.trainer.hold = outcome is JobState.CANCELLED
    env.trainer.error = RuntimeError("boom") if outcome is JobState.FAILED else None
    m = env.manager(start=True)
    job = m.submit(request("vader"))
    assert env.trainer.started.wait(TIMEOUT)
    if outcome is JobState.CANCELLED:
        assert env.trainer.held.wait(TIMEOUT)
        assert env.store.get(job.id).checkpoint  # type: ignore[union-attr]
        m.cancel(job.id)
    wait_state(m, job.id, outcome)
    wait_checkpoints_gone(env, job.id)


def test_checkpoints_survive_a_shutdown_for_the_next_process(env: Env) -> None:
    env.trainer.hold = True
    m = env.manager(start=True)
    job = m.submit(request("vader"))
    assert env.trainer.held.wait(TIMEOUT)
    m.stop(timeout=TIMEOUT)
    stored = env.store.get(job.id)
    assert stored is not None and stored.state is JobState.QUEUED
    assert stored.checkpoint == checkpoint_key(job, 1)  # kept to resume from
    assert env.artifacts.exists(stored.checkpoint)

    env.trainer.hold = False
    m2 = env.manager(start=True)
    done = wait_state(m2, job.id, JobState.SUCCEEDED)
    assert done.fence == 2
    # The resumed run found the checkpoint in its checkpoint directory.
    assert env.trainer.found == [{}, {f"step-00000001/{CHECKPOINT_FILE}": b"checkpoint at 1"}]
    wait_checkpoints_gone(env, job.id)


def test_a_job_whose_replica_died_resumes_on_another_from_its_last_checkpoint(
    env: Env,
) -> None:
    """Replica "gone" claimed the job, committed a checkpoint at step 2 and two loss points,
    and died; replica "b" claims it once the lease expired, resumes from that checkpoint,
    and the loss curve has every step once."""
    dead = insert_running(env, "j1", "vader", worker="gone", lease_s=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CHECKPOINT_FILE).write_bytes(b"checkpoint at 2")
        env.artifacts.put_dir(f"{checkpoint_prefix('j1')}/1-00000002", Path(tmp))
    env.store.save_checkpoint("j1", dead.fence, f"{checkpoint_prefix('j1')}/1-00000002")
    points = [LossPoint(step=s, epoch=0.0, loss=9.0) for s in (1, 2)]
    env.store.add_loss_points("j1", dead.fence, points)

    b, registry_b = env.replica("b", trainer=FakeTrainer(), start=True)
    done = wait_state(b, "j1", JobState.SUCCEEDED)
    trainer = env.trainers[-1]
    assert trainer.found == [{f"step-00000002/{CHECKPOINT_FILE}": b"checkpoint at 2"}]
    assert (done.attempts, done.fence) == (2, 2)
    assert [p.step for p in b.loss_curve("j1")] == [1, 2, 3]
    assert [p.loss for p in b.loss_curve("j1")][:2] == [1.0, 0.5]  # the resumed run's
    assert registry_b.get("vader").source_job_id == "j1"
    wait_checkpoints_gone(env, "j1")


# --- loss curve


def curve_trainer(
    *, output_dir: Path, on_progress: Callable[[Progress], None], **_: Any
) -> FakeResult:
    """Four steps over two epochs, evaluated at step 2."""
    for step in range(1, 5):
        on_progress(
            Progress(
                step=step,
                total_steps=4,
                epoch=step / 2,
                loss=2.0 / step,
                eval_loss=0.9 if step >= 2 else 0.0,
                eval_step=2 if step >= 2 else 0,
            )
        )
    (output_dir / "adapter_model.safetensors").write_bytes(WEIGHTS)
    return FakeResult(final_loss=0.5, steps=4, trained_tokens=8)


def manager_with(env: Env, trainer: Any) -> JobManager:
    return env.manager(trainer=trainer)


def test_loss_curve_has_every_reported_step_in_order(env: Env) -> None:
    m = manager_with(env, curve_trainer)
    job = m.submit(request("curvy"))
    assert m.loss_curve(job.id) == []  # queued: nothing yet
    m.start()
    wait_state(m, job.id, JobState.SUCCEEDED)
    assert m.loss_curve(job.id) == [
        LossPoint(step=1, epoch=0.5, loss=2.0, eval_loss=None),
        LossPoint(step=2, epoch=1.0, loss=1.0, eval_loss=0.9),  # evaluated at this step
        LossPoint(step=3, epoch=1.5, loss=cast(float, pytest.approx(2 / 3)), eval_loss=None),
        LossPoint(step=4, epoch=2.0, loss=0.5, eval_loss=None),
    ]


def test_loss_curve_of_an_unknown_job_is_not_found(env: Env) -> None:
    with pytest.raises(NotFound) as info:
        env.manager().loss_curve("nope")
    assert info.value.field == "job_id"


def test_loss_curve_of_a_failed_job_keeps_its_last_steps(env: Env) -> None:
    def diverging(*, on_progress: Callable[[Progress], None], **_: Any) -> FakeResult:
        for step in range(1, 4):
            on_progress(Progress(step=step, total_steps=10, loss=float(step)))
        raise RuntimeError("loss is NaN")

    m = manager_with(env, diverging)
    m.start()
    job = m.submit(request("diverging"))
    failed = wait_state(m, job.id, JobState.FAILED)
    assert failed.progress.step == 3
    assert [p.step for p in m.loss_curve(job.id)] == [1, 2, 3]


def test_request_id_reused_with_another_request_is_refused(env: Env) -> None:
    m = env.manager()
    first = m.submit(request("vader", request_id="req-1"))
    with pytest.raises(AlreadyExists) as info:
        m.submit(request("vader", request_id="req-1", training=TrainingSpec(epochs=9)))
    assert info.value.field == "request_id"
    assert first.id in info.value.message
    assert len(m.list_jobs(state=None, offset=0, limit=10)) == 1


def test_the_queue_is_bounded_with_a_retry_hint(env: Env) -> None:
    m = env.manager(Limits(max_queued_jobs=3, max_queued_jobs_per_caller=3))
    for i in range(3):
        m.submit(request(f"a{i}"))
    with pytest.raises(ResourceExhausted) as info:
        m.submit(request("a3"))
    assert info.value.reason == "QUEUE_FULL"
    assert info.value.retry_after_s > 0
    assert len(m.list_jobs(state=None, offset=0, limit=10)) == 3
    m.cancel(m.list_jobs(state=None, offset=0, limit=1)[0].id)  # a slot frees
    m.submit(request("a3"))


def test_one_caller_cannot_fill_the_queue(env: Env) -> None:
    m = env.manager(Limits(max_queued_jobs=10, max_queued_jobs_per_caller=2))
    m.submit(request("a0", caller="alice"))
    m.submit(request("a1", caller="alice"))
    with pytest.raises(ResourceExhausted) as info:
        m.submit(request("a2", caller="alice"))
    assert info.value.reason == "CALLER_QUEUE_FULL"
    m.submit(request("b0", caller="bob"))  # another caller still gets in


def test_target_modules_that_match_no_layer_are_refused_before_queueing(env: Env) -> None:
    layers = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "lm_head"]
    m = env.manager(layer_names=lambda: layers)
    with pytest.raises(InvalidArgument) as info:
        m.submit(request("typo", lora=LoraSpec(target_modules=("c_attn", "q_proj"))))
    assert info.value.field == "lora.target_modules[1]"
    assert "c_attn" in info.value.message  # the names it could have meant
    ok = m.submit(request("ok", lora=LoraSpec(target_modules=("c_attn", "attn.c_proj"))))
    assert ok.state is JobState.QUEUED
    assert len(m.list_jobs(state=None, offset=0, limit=10)) == 1


def test_labels_on_a_causal_job_are_refused(env: Env) -> None:
    with pytest.raises(InvalidArgument) as info:
        env.manager().submit(request("causal", labels=("yes", "no")))
    assert info.value.field == "labels"


def test_an_adapter_its_own_job_already_published_ends_that_job_succeeded(env: Env) -> None:
    """A release before the shared store could die between publishing a job's adapter and
    marking the job SUCCEEDED; after the upgrade the adapter is imported and the job, still
    RUNNING, is claimed again. Its publish finds its own adapter: the job ends SUCCEEDED
    (before, FAILED as ADAPTER_EXISTS) and the adapter published first is the one kept."""
    insert_running(env, "j-pub", "published")
    first = register_parent(env, adapter_id="published", source_job_id="j-pub", steps=3)
    env.trainer.weights = b"trained again"

    m = env.manager(start=True)
    done = wait_state(m, "j-pub", JobState.SUCCEEDED)
    assert done.error is None
    assert env.registry.get("published") == first
    path = env.registry.path("published")
    assert (path / "adapter_model.safetensors").read_bytes() == WEIGHTS
    # The second upload is removed once the publish found the first.
    wait_until(lambda: len(adapter_versions(env, "published")) == 1)
    wait_until(lambda: len(env.registered) == 1)
    assert env.registered == [first]


def test_another_jobs_adapter_under_the_same_id_is_not_taken_as_published(env: Env) -> None:
    insert_running(env, "j-2", "taken")
    register_parent(env, adapter_id="taken", source_job_id="someone-else")
    m = env.manager(start=True)
    failed = wait_state(m, "j-2", JobState.FAILED)
    assert failed.error is not None and failed.error.code == "ADAPTER_EXISTS"
    assert env.registry.get("taken").source_job_id == "someone-else"
    assert len(adapter_versions(env, "taken")) == 1  # the job's upload was removed
    assert env.registered == []


@pytest.mark.parametrize("where", ["snapshot", "upload"])
def test_a_full_disk_at_submit_is_resource_exhausted_and_leaves_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from tuneserve.jobs import manager as manager_module

    def full_snapshot(rows: Any, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_upload(key: str, source: Path) -> int:
        (env.artifacts.root / key).mkdir(parents=True)  # as a partial write may leave it
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "snapshot":
        monkeypatch.setattr(manager_module, "write_snapshot", full_snapshot)
    else:
        monkeypatch.setattr(env.artifacts, "put_dir", full_upload)
    m = env.manager()
    with pytest.raises(ResourceExhausted) as info:
        m.submit(request("vader"))
    assert info.value.reason == "DISK_FULL"
    assert "disk is full" in info.value.message
    assert m.list_jobs(state=None, offset=0, limit=10) == []
    datasets = env.artifacts.root / "datasets"
    assert not datasets.exists() or list(datasets.iterdir()) == []


def test_a_full_disk_while_training_fails_the_job_as_disk_full(env: Env) -> None:
    # As torch's zip writer fails: a RuntimeError raised while handling the OSError.
    error = RuntimeError("[enforce fail at inline_container.cc] file write failed")
    error.__context__ = OSError(errno.ENOSPC, "No space left on device")
    env.trainer.error = error
    m = env.manager(start=True)
    job = m.submit(request("vader"))
    failed = wait_state(m, job.id, JobState.FAILED)
    assert failed.error is not None
    assert failed.error.code == "DISK_FULL"
    assert "disk is full" in failed.error.message


class FlakyStore:
    """Delegates to a real store; the first write that ends `job_id` fails as a full disk
    does."""

    def __init__(self, inner: SQLiteJobStore, job_id: str) -> None:
        self._inner, self._job_id, self.failed = inner, job_id, False

    def finish(self, job: Job) -> None:
        if job.id == self._job_id and not self.failed:
            self.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        self._inner.finish(job)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_failed_bookkeeping_write_does_not_stop_the_worker(env: Env) -> None:
    """Before, the exception ended the worker thread: no job ran again until a restart."""
    failures: list[str] = []

    def first_fails(**kw: Any) -> FakeResult:
        if kw["spec"].adapter_id == "first" and not failures:
            failures.append("first")
            raise RuntimeError("boom")
        return env.trainer(**kw)

    queue = env.manager(trains=False)
    first = queue.submit(request("first"))
    second = queue.submit(request("second"))
    store = FlakyStore(env.store, first.id)
    m = env.manager(store=cast(JobStore, store), trainer=first_fails, start=True)
    done = wait_state(m, second.id, JobState.SUCCEEDED)
    assert store.failed
    assert done.error is None
    # The first job's end was not recorded: it is RUNNING in the store under this
    # replica's lease, which the next start voids; then it runs again.
    assert env.store.get(first.id).state is JobState.RUNNING  # type: ignore[union-attr]
    m.stop(timeout=TIMEOUT)
    again = env.manager(trainer=first_fails, start=True)
    assert wait_state(again, first.id, JobState.SUCCEEDED).error is None
    assert [c[0] for c in env.trainer.calls] == ["second", "first"]


def test_an_oversized_chat_template_is_refused_before_it_is_rendered(env: Env) -> None:
    chat = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    with pytest.raises(InvalidArgument) as info:
        env.manager().submit(request("big", rows=chat, chat_template="{{ 'x' }}" * 100_000))
    assert info.value.field == "chat_template"
    assert "limit" in info.value.message


def test_final_progress_and_samples_are_committed_with_the_adapter(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transaction publishes the adapter (its files uploaded first) and marks the job
    SUCCEEDED with its final progress and samples: a crash leaves all of it or none."""
    samples = ({"prompt": "Q: hi", "reference": "A: hello", "generated": "A: yo"},)
    real_call = FakeTrainer.__call__

    def with_samples(self: FakeTrainer, **kw: Any) -> FakeResult:
        result = real_call(self, **kw)
        result.samples = samples
        return result

    monkeypatch.setattr(FakeTrainer, "__call__", with_samples)
    seen: list[tuple[Job | None, bool]] = []
    publish = env.store.publish

    def spy(job: Job, record: Any) -> Any:
        seen.append((env.store.get(job.id), env.artifacts.exists(record.key)))
        return publish(job, record)

    monkeypatch.setattr(env.store, "publish", spy)
    m = env.manager(start=True)
    job = m.submit(request("vader"))
    wait_state(m, job.id, JobState.SUCCEEDED)
    [(before, uploaded)] = seen
    assert uploaded  # the files were whole before the row could name them
    assert before is not None and before.state is JobState.RUNNING
    assert env.store.get_adapter("vader") is not None
    stored = env.store.get(job.id)
    assert stored is not None and stored.state is JobState.SUCCEEDED
    assert stored.samples == list(samples)
    assert (stored.progress.step, stored.progress.total_steps) == (3, 3)


# --- many replicas on one store


def test_jobs_submitted_on_two_replicas_run_once_each_on_either(env: Env) -> None:
    a, _ = env.replica("a", trainer=FakeTrainer(), start=True)
    b, _ = env.replica("b", trainer=FakeTrainer(), start=True)
    trainer_a, trainer_b = env.trainers[-2:]
    ids = [f"j{i}" for i in range(6)]
    jobs = [(a if i % 2 else b).submit(request(adapter_id)) for i, adapter_id in enumerate(ids)]
    for job in jobs:
        done = wait_state(a, job.id, JobState.SUCCEEDED)
        assert (done.attempts, done.fence) == (1, 1)
        assert b.get(job.id).state is JobState.SUCCEEDED
    ran = [c[0] for c in trainer_a.calls + trainer_b.calls]
    assert sorted(ran) == ids  # each once, on one replica or the other
    assert sorted(r.id for r in env.store.list_adapters()) == ids
    assert all(len(adapter_versions(env, i)) == 1 for i in ids)
    wait_until(lambda: len(env.registered) == len(ids))
    assert sorted(info.id for info in env.registered) == ids


def test_a_serving_replica_queues_jobs_that_a_training_replica_runs(env: Env) -> None:
    serve, serve_registry = env.replica("serve", trains=False, start=True)
    env.replica("train", trainer=FakeTrainer(), start=True)
    job = serve.submit(request("vader"))
    done = wait_state(serve, job.id, JobState.SUCCEEDED)  # read from the shared store
    assert (done.progress.step, done.progress.total_steps) == (3, 3)
    assert env.trainers[-1].calls == [("vader", ROWS)]
    assert [j.id for j in serve.list_jobs(state=None, offset=0, limit=10)] == [job.id]
    assert [p.step for p in serve.loss_curve(job.id)] == [1, 2, 3]
    weights = serve_registry.path("vader") / "adapter_model.safetensors"
    assert weights.read_bytes() == WEIGHTS


def test_cancel_on_a_replica_that_does_not_run_the_job_stops_it(env: Env) -> None:
    """The request reaches the replica running the job through its heartbeat (every third
    of its lease)."""
    runner_trainer = FakeTrainer(hold=True)
    runner, _ = env.replica("runner", trainer=runner_trainer, lease_s=3.0, start=True)
    other, other_registry = env.replica("other", trainer=FakeTrainer())
    job = other.submit(request("vader"))
    assert runner_trainer.held.wait(TIMEOUT)
    other.start()  # trains too, but the job is the runner's

    asked = other.cancel(job.id)
    assert asked.state is JobState.RUNNING and asked.cancel_requested
    t0 = time.monotonic()
    done = wait_state(other, job.id, JobState.CANCELLED)
    assert time.monotonic() - t0 < 3.0  # within the lease
    assert done.error is None
    assert runner.get(job.id).state is JobState.CANCELLED
    assert not other_registry.exists("vader")
    with pytest.raises(FailedPrecondition):
        other.cancel(job.id)
    # The replicas go on; the cancel was this job's only. Either may claim the next job,
    # so the runner's trainer no longer holds.
    runner_trainer.release.set()
    nxt = other.submit(request("next"))
    wait_state(other, nxt.id, JobState.SUCCEEDED)


class PartitionedStore:
    """Delegates to a real store, but heartbeats never get through (a replica cut off from
    the database, or stalled): its leases run out while it goes on training."""

    def __init__(self, inner: JobStore) -> None:
        self._inner = inner

    def heartbeat(self, job_id: str, fence: int, lease_s: float) -> bool:
        raise Unavailable("the job store is unreachable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.parametrize(("ending", "hold_step"), [("publish", 3), ("fail", 3), ("progress", 1)])
def test_a_worker_whose_lease_was_taken_writes_nothing_more(
    env: Env, ending: str, hold_step: int
) -> None:
    """Replica a's lease on the job runs out while it trains; replica b claims the job
    (a new fence), resumes it from a's checkpoint and publishes. When a goes on, its publish,
    its final state or its progress is refused (LeaseLost): the job ends as b ended it, and
    the adapter is published once, by b."""
    stale = FakeTrainer(hold=True, hold_step=hold_step, weights=b"stale weights")
    env.trainers.append(stale)
    store_a = env.open_store()
    registry_a = env.open_registry(store_a, "a")
    a = env.manager(
        store=cast(JobStore, PartitionedStore(store_a)),
        registry=registry_a,
        trainer=stale,
        worker_id="a",
        lease_s=1.0,
        start=True,
    )
    worker_a = env.workers[-1]
    job = a.submit(request("vader"))
    assert stale.held.wait(TIMEOUT)

    fresh = FakeTrainer(weights=b"fresh weights")
    b, _ = env.replica("b", trainer=fresh, start=True)
    done = wait_state(b, job.id, JobState.SUCCEEDED)  # once a's lease ran out
    assert (done.attempts, done.fence) == (2, 2)
    assert fresh.found == [{f"step-00000001/{CHECKPOINT_FILE}": b"checkpoint at 1"}]

    if ending == "fail":
        stale.error = RuntimeError("boom")
    stale.release.set()
    wait_until(lambda: not stale.threads[0].is_alive() and worker_a.running is None)

    final = env.store.get(job.id)
    assert final is not None
    assert (final.state, final.error, final.fence) == (JobState.SUCCEEDED, None, 2)
    assert a.get(job.id).state is JobState.SUCCEEDED
    record = env.store.get_adapter("vader")
    assert record is not None and adapter_versions(env, "vader") == [record.version]
    weights = registry_a.path("vader") / "adapter_model.safetensors"
    assert weights.read_bytes() == b"fresh weights"
    wait_until(lambda: len(env.registered) >= 1)
    assert [info.id for info in env.registered] == ["vader"]  # published once, by b
    assert [p.step for p in env.store.loss_curve(job.id)] == [1, 2, 3]
    assert list(registry_a.staging_root.iterdir()) == []


def test_an_earlier_releases_snapshots_of_queued_jobs_move_to_the_artifact_store(
    env: Env,
) -> None:
    """Upgrading with a job still queued: its rows (datasets/<job>.jsonl of the
    single-process releases) are moved where the worker reads them, and it trains on them."""
    from tuneserve.jobs.manager import import_legacy_snapshots

    m = env.manager()
    queued = m.submit(request("old-queued", training=TrainingSpec(epochs=1)))
    key = dataset_key(queued.id)
    legacy = env.tmp / "datasets"
    with tempfile.TemporaryDirectory() as tmp:  # the old layout, from the stored snapshot
        env.artifacts.get_dir(key, Path(tmp) / "d")
        legacy.mkdir()
        shutil.copyfile(Path(tmp) / "d" / "train.jsonl", legacy / f"{queued.id}.jsonl")
    env.artifacts.delete(key)
    (legacy / "finished-job.jsonl").write_text('{"text": "x"}\n')  # no such job to run

    assert import_legacy_snapshots(legacy, env.store, env.artifacts) == 1
    assert env.artifacts.exists(key)
    assert sorted(p.name for p in legacy.iterdir()) == ["finished-job.jsonl"]
    assert import_legacy_snapshots(legacy, env.store, env.artifacts) == 0
    m.start()
    wait_state(m, queued.id, JobState.SUCCEEDED)
    assert env.trainer.calls == [("old-queued", ROWS)]
