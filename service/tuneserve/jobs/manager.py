"""The job queue and its worker: jobs run one at a time, in the order they were accepted, on
a background thread. States move QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, and
every change is written to the store, so a restart loses nothing:

- a job QUEUED when the process stopped is queued again, in its old place;
- a job RUNNING when the process died starts again from the beginning, unless it has
  already been started `max_job_attempts` times, in which case it is FAILED (INTERRUPTED)
  rather than crash-looping the server;
- on a graceful shutdown the running job is stopped and put back in the queue.

Progress of the running job is kept in memory at every step and written to the store at
most once a second, so GetStatus is exact while the store is not hammered."""

from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import random
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuneserve import failpoints
from tuneserve.data.chat_template import TemplateRenderer, shared_renderer
from tuneserve.data.rows import (
    Row,
    read_jsonl,
    read_snapshot,
    resolve_dataset_path,
    validate_rows,
    write_snapshot,
)
from tuneserve.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    collect,
    shown,
)
from tuneserve.jobs.model import (
    DatasetFormat,
    Job,
    JobFailure,
    JobSpec,
    JobState,
    LoraSpec,
    Progress,
    Task,
    TrainingSpec,
)
from tuneserve.jobs.store import JobStore, LossPoint
from tuneserve.logs import job_id_var
from tuneserve.registry import AdapterInfo, AdapterRegistry
from tuneserve.torch_threads import run_in_own_thread

log = logging.getLogger(__name__)

PERSIST_EVERY_S = 1.0  # the job row; loss points are written every step
MAX_CHAT_TEMPLATE_CHARS = 256 * 1024  # real ones are a few kB
WORKER_RETRY_S = 1.0  # after a failed bookkeeping write, before the next job


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """A TrainJob call, transport-free. Exactly one of `rows` and `dataset_path` is set;
    at most one of `validation_rows` and `validation_path`."""

    rows: Sequence[dict[str, Any]] | None = None
    dataset_path: str | None = None
    adapter_id: str = ""
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)
    training: TrainingSpec = dataclasses.field(default_factory=TrainingSpec)
    request_id: str = ""
    validation_rows: Sequence[dict[str, Any]] | None = None
    validation_path: str | None = None
    parent_adapter_id: str = ""
    task: Task = Task.CAUSAL_LM
    labels: tuple[str, ...] = ()  # classification: default, the sorted distinct row labels
    chat_template: str = ""  # chat rows: default, the base tokenizer's
    # Who is asking (a bearer token's fingerprint; "" without tokens): bounds their share.
    caller: str = ""
    # The `lora` and `training` fields the caller gave (the rest are defaults): a continued
    # adapter takes its parent's settings for the others, and refuses lora that differs.
    lora_given: frozenset[str] = frozenset()
    training_given: frozenset[str] = frozenset()

    def fingerprint(self) -> str:
        """sha256 of everything that makes this request what it is (not who sent it)."""
        body = dataclasses.asdict(self)
        del body["caller"], body["request_id"]
        text = json.dumps(body, sort_keys=True, default=_jsonable, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _jsonable(value: object) -> object:
    return sorted(value) if isinstance(value, set | frozenset) else str(value)


# A continued adapter takes these from its parent's job when the request leaves them unset.
INHERITED_TRAINING = (
    "epochs",
    "learning_rate",
    "batch_size",
    "max_seq_length",
    "warmup_steps",
    "scheduler",
    "weight_decay",
    "gradient_accumulation_steps",
    "loss_on",
    "gradient_checkpointing",
)


class Trainer(Protocol):
    """Trains one job's adapter into `output_dir`; raises StopTraining when told to stop."""

    def __call__(
        self,
        *,
        spec: JobSpec,
        rows: Sequence[Row],
        output_dir: Path,
        on_progress: Callable[[Progress], None],
        should_stop: Callable[[], bool],
        validation_rows: Sequence[Row],
        parent_adapter_dir: Path | None,
        checkpoint_dir: Path | None,
    ) -> Any: ...


class JobObserver(Protocol):
    """Receives the job worker's events (tuneserve.metrics.Metrics implements it)."""

    def job_progress(
        self, *, steps: int, tokens: int, loss: float, tokens_per_second: float
    ) -> None: ...

    def job_finished(self, *, state: str, seconds: float) -> None: ...


class _NoObserver:
    def job_progress(self, **_: Any) -> None:
        pass

    def job_finished(self, **_: Any) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class Limits:
    dataset_roots: tuple[Path, ...] = ()
    max_dataset_rows: int = 100_000
    max_dataset_bytes: int = 256 * 1024 * 1024
    max_job_attempts: int = 3
    max_queued_jobs: int = 64  # queued or running, all callers
    max_queued_jobs_per_caller: int = 16


class JobManager:
    """Thread-safe: every public method may be called from any thread."""

    def __init__(
        self,
        *,
        store: JobStore,
        registry: AdapterRegistry,
        trainer: Trainer,
        base_model: str,
        datasets_dir: Path,
        limits: Limits,
        on_adapter_registered: Callable[[AdapterInfo], None] = lambda info: None,
        checkpoints_dir: Path | None = None,
        base_chat_template: Callable[[], str | None] = lambda: None,
        before_training_step: Callable[[], None] = lambda: None,
        observer: JobObserver | None = None,
        layer_names: Callable[[], Sequence[str] | None] = lambda: None,
        chat_renderer: TemplateRenderer | None = None,
        base_special_tokens: Callable[[], Mapping[str, str]] = lambda: {},
    ) -> None:
        self._store = store
        self._registry = registry
        self._trainer = trainer
        self._base_model = base_model
        self._datasets_dir = datasets_dir
        self._limits = limits
        self._on_registered = on_adapter_registered
        self._checkpoints_dir = checkpoints_dir
        self._base_chat_template = base_chat_template
        self._before_training_step = before_training_step
        self._observer: JobObserver = observer or _NoObserver()
        self._layer_names = layer_names
        self._chat_renderer = chat_renderer or shared_renderer()
        self._base_special_tokens = base_special_tokens
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._running: Job | None = None
        self._cancel_running = False
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None

    # --- lifecycle

    def start(self) -> None:
        """Recover jobs left by the last process and start the worker."""
        for job in self._store.in_states(JobState.RUNNING):
            if (published := self._published_by(job)) is not None:
                # Killed after publishing, before SUCCEEDED was written: the job is done,
                # and its row already holds its final progress and samples (see `_run`).
                log.info("job %s had published adapter %s; finishing it", job.id, published.id)
                self._finish(job, JobState.SUCCEEDED, None)
                self._on_registered(published)
            elif job.attempts >= self._limits.max_job_attempts:
                log.warning("job %s was interrupted %d times; failing it", job.id, job.attempts)
                self._finish(
                    job,
                    JobState.FAILED,
                    JobFailure(
                        code="INTERRUPTED",
                        message=f"the server stopped while this job ran, {job.attempts} times",
                    ),
                )
            else:
                log.info("job %s was interrupted; queueing it again", job.id)
                job.state, job.progress = JobState.QUEUED, Progress()
                self._store.update(job)
        with self._cond:
            self._queue.extend(j.id for j in self._store.in_states(JobState.QUEUED))
        self._thread = threading.Thread(target=self._work, name="job-worker", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the running job (it goes back to the queue) and the worker."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- API

    def submit(self, request: TrainRequest) -> Job:
        """Validate everything, snapshot the dataset, queue the job. A request_id seen before
        (a client's retry, even one racing the first call) returns the first call's job, if
        the request is the same; another request under a used request_id is refused."""
        fingerprint = request.fingerprint()
        with self._cond:
            if not self._accepting:
                raise FailedPrecondition("the server is shutting down; retry on another replica")
            if first := self._by_request_id(request.request_id, fingerprint):
                return first
            self._check_room(request.caller)  # cheap, and before reading a large dataset
        job_id = uuid.uuid4().hex[:16]
        if request.task not in (Task.CAUSAL_LM, Task.CLASSIFICATION):
            raise InvalidArgument(f"task: {shown(request.task)} is not a task", field="task")
        spec = JobSpec(
            base_model=self._base_model,
            adapter_id=request.adapter_id or f"adapter-{job_id}",
            dataset_format=DatasetFormat.TEXT,
            dataset_rows=0,
            lora=request.lora,
            training=request.training,
            request_id=request.request_id,
            parent_adapter_id=request.parent_adapter_id,
            task=request.task,
            caller=request.caller,
            request_fingerprint=fingerprint,
        ).validate()  # settings first: cheap, and reported before reading a large file
        parent = self._parent(spec) if spec.parent_adapter_id else None
        if parent is not None:
            spec = self._continue_from(spec, parent, request)
        else:
            self._check_target_modules(spec.lora.target_modules)
        dataset_format, rows = self._load_rows(request)
        all_rows = rows
        rows, validation = self._split_validation(request, spec, dataset_format, rows)
        given = validation if len(rows) == len(all_rows) else []  # not a held-out share
        # Labels are checked on the rows as the caller numbered them, before any split.
        labels = self._labels(request, dataset_format, all_rows, given, parent)
        if dataset_format is DatasetFormat.CHAT:
            self._check_chat_template(request.chat_template, rows[0]["messages"])
        spec = dataclasses.replace(
            spec,
            dataset_format=dataset_format,
            dataset_rows=len(rows),
            validation_rows=len(validation),
            labels=labels,
            chat_template=request.chat_template,
        )
        job = Job(id=job_id, spec=spec)
        with self._cond:
            if first := self._by_request_id(request.request_id, fingerprint):
                return first
            self._check_adapter_id_free(spec.adapter_id)
        try:
            write_snapshot(rows, self._snapshot_path(job_id))  # large: not under the lock
            if validation:
                write_snapshot(validation, self._snapshot_path(job_id, "validation"))
            with self._cond:
                if first := self._by_request_id(request.request_id, fingerprint):
                    self._remove_snapshots(job_id)
                    return first
                self._check_adapter_id_free(spec.adapter_id)  # a racing submit may have won
                self._check_room(request.caller)
                self._store.insert(job)
                self._queue.append(job_id)
                self._cond.notify_all()
        except BaseException as e:
            self._remove_snapshots(job_id)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(e) from None
            raise
        failpoints.hit("job.queued")
        log.info("job %s queued: %d rows -> adapter %s", job_id, len(rows), spec.adapter_id)
        return self.get(job_id)

    def _check_room(self, caller: str) -> None:
        """A bounded queue: past its size, or a caller's share of it, the caller is told to
        retry later (RESOURCE_EXHAUSTED with a hint), never queued without end. Call under
        the lock."""
        active = self._store.in_states(JobState.QUEUED, JobState.RUNNING)
        limits = self._limits
        retry_after = self._retry_after(len(active))
        if len(active) >= limits.max_queued_jobs:
            raise ResourceExhausted(
                f"{len(active)} training jobs are queued or running, the most this server "
                "takes; retry later",
                retry_after_s=retry_after,
                reason="QUEUE_FULL",
            )
        mine = sum(1 for j in active if j.spec.caller == caller)
        if mine >= limits.max_queued_jobs_per_caller:
            raise ResourceExhausted(
                f"you have {mine} training jobs queued or running, the most one caller may "
                "have; retry when one has finished",
                retry_after_s=retry_after,
                reason="CALLER_QUEUE_FULL",
            )

    def _retry_after(self, active: int) -> float:
        """When a slot may free: the running job's ETA, else a minute per job ahead."""
        running = self._running
        if running is not None and running.progress.eta_seconds > 0:
            return float(min(max(running.progress.eta_seconds, 5.0), 3600.0))
        return float(min(60.0 * max(active, 1), 3600.0))

    def _remove_snapshots(self, job_id: str) -> None:
        for split in ("train", "validation"):
            self._snapshot_path(job_id, split).unlink(missing_ok=True)

    def get(self, job_id: str) -> Job:
        with self._cond:
            if self._running is not None and self._running.id == job_id:
                return copy.deepcopy(self._running)
            job = self._store.get(job_id)
            if job is None:
                raise NotFound(f"job {shown(job_id)} not found", field="job_id")
            if job.state is JobState.QUEUED and job_id in self._queue:
                job.queue_position = self._queue.index(job_id)
            return job

    def list_jobs(self, *, state: JobState | None, offset: int, limit: int) -> list[Job]:
        jobs = self._store.list(state=state, offset=offset, limit=limit)
        return [
            self.get(j.id) if j.state in (JobState.QUEUED, JobState.RUNNING) else j for j in jobs
        ]

    def cancel(self, job_id: str) -> Job:
        with self._cond:
            job = self.get(job_id)
            if job.state.final:
                raise FailedPrecondition(
                    f"job {job_id} is already {job.state.value}", field="job_id"
                )
            if job.state is JobState.QUEUED:
                if job_id in self._queue:
                    self._queue.remove(job_id)
                self._finish(job, JobState.CANCELLED, None)
            else:
                self._cancel_running = True
        log.info("job %s cancel requested", job_id)
        return self.get(job_id)

    # --- worker

    def _work(self) -> None:
        """The worker loop. Nothing a job does may end it: a job whose bookkeeping fails
        (the store's disk full, say) is logged and left for the next start's recovery, and
        the worker takes the next one, rather than the queue stalling for everyone."""
        while not self._stopping:
            try:
                self._work_one()
            except Exception:
                log.exception("job worker: a job's bookkeeping failed; going on")
                with self._cond:
                    self._running = None
                    self._cond.wait(WORKER_RETRY_S)

    def _work_one(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._store.get(self._queue.popleft())
                if job is None or job.state is not JobState.QUEUED:
                    continue
                job.state, job.started_at, job.error = JobState.RUNNING, time.time(), None
                job.attempts += 1
                job.progress = Progress()
                self._store.update(job)
                self._running, self._cancel_running = job, False
            # A thread of its own, which ends with the job: see torch_threads.py.
            run_in_own_thread(functools.partial(self._run, job), name=f"job-{job.id}")
            return

    def _run(self, job: Job) -> None:
        job_id_var.set(job.id)
        staging = self._registry.staging_dir()
        last_persist = 0.0

        def on_progress(progress: Progress) -> None:
            nonlocal last_persist
            previous = job.progress
            resumed = previous.step < progress.resumed_from_step  # first report after resume
            self._observer.job_progress(
                steps=progress.step - max(previous.step, progress.resumed_from_step),
                tokens=0 if resumed else progress.trained_tokens - previous.trained_tokens,
                loss=progress.loss,
                tokens_per_second=progress.tokens_per_second,
            )
            evaluated = progress.eval_step == progress.step
            # Every point is written at once: a run resumed from a checkpoint continues the
            # curve from there, so no step before a checkpoint may exist only in memory.
            point = LossPoint(
                step=progress.step,
                epoch=progress.epoch,
                loss=progress.loss,
                eval_loss=progress.eval_loss if evaluated else None,
            )
            self._store.add_loss_points(job.id, [point])
            failpoints.hit("job.step")
            with self._cond:
                job.progress = dataclasses.replace(progress)
                now = time.monotonic()
                if now - last_persist >= PERSIST_EVERY_S or progress.step == progress.total_steps:
                    last_persist = now
                    self._store.update(job)

        def should_stop() -> bool:
            if self._cancel_running or self._stopping:
                return True
            self._before_training_step()  # the co-serving policy (tuneserve.coserving)
            return self._cancel_running or self._stopping

        from tuneserve.training.recipe import StopTraining  # torch only where jobs run

        log.info("job %s started (attempt %d)", job.id, job.attempts)
        try:
            validation_path = self._snapshot_path(job.id, "validation")
            parent = job.spec.parent_adapter_id
            result = self._trainer(
                spec=job.spec,
                rows=read_snapshot(self._snapshot_path(job.id)),
                output_dir=staging,
                on_progress=on_progress,
                should_stop=should_stop,
                validation_rows=read_snapshot(validation_path) if validation_path.exists() else [],
                parent_adapter_dir=self._registry.path(parent) if parent else None,
                checkpoint_dir=self._checkpoint_dir(job.id),
            )
            # The final progress and samples are written before the adapter is published,
            # so a crash between the two loses nothing a normal end would have kept.
            with self._cond:
                job.samples = list(result.samples)
                self._store.update(job)
            info = self._registry.register(
                staging,
                AdapterInfo(
                    id=job.spec.adapter_id,
                    base_model=job.spec.base_model,
                    r=job.spec.lora.r,
                    alpha=job.spec.lora.alpha,
                    dropout=job.spec.lora.dropout,
                    target_modules=tuple(result.target_modules),
                    source_job_id=job.id,
                    final_loss=result.final_loss,
                    steps=result.steps,
                    trained_tokens=result.trained_tokens,
                    parent_adapter_id=parent,
                    eval_loss=result.eval_loss,
                    task=job.spec.task.value,
                    labels=job.spec.labels,
                    use_dora=job.spec.lora.use_dora,
                ),
            )
            failpoints.hit("job.published")
        except StopTraining:
            if self._cancel_running:
                self._finish(job, JobState.CANCELLED, None)
            else:  # shutting down: it resumes from its checkpoint after the restart
                log.info("job %s stopped by shutdown; it will run again", job.id)
                with self._cond:
                    job.state, job.started_at, job.progress = JobState.QUEUED, None, Progress()
                    job.attempts -= 1
                    self._store.update(job)
                    self._running = None
        except (InvalidArgument, AlreadyExists) as e:
            code = "INVALID_DATASET" if isinstance(e, InvalidArgument) else "ADAPTER_EXISTS"
            self._finish(
                job,
                JobState.FAILED,
                JobFailure(code=code, message=e.message, field=e.field, row=e.row),
            )
        except Exception as e:
            if _is_disk_full(e, self._registry.root):
                log.error("job %s failed: the disk is full (%s)", job.id, e)
                failure = JobFailure(code="DISK_FULL", message=disk_full(e).message)
            else:
                log.exception("job %s failed", job.id)
                failure = JobFailure(code="TRAINING_FAILED", message=f"{type(e).__name__}: {e}")
            self._finish(job, JobState.FAILED, failure)
        else:
            # Published: from here on the job can only succeed. Should this write fail, the
            # job stays RUNNING in the store and the next start finishes it from its adapter
            # (`_published_by`), never FAILED with its adapter registered.
            self._finish(job, JobState.SUCCEEDED, None)
            failpoints.hit("job.succeeded")
            self._on_registered(info)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _published_by(self, job: Job) -> AdapterInfo | None:
        """The adapter this very job published, if it did (a crash after publishing)."""
        try:
            info = self._registry.get(job.spec.adapter_id)
        except (NotFound, FailedPrecondition):  # none, or a damaged entry: not this job's
            return None
        return info if info.source_job_id == job.id else None

    def loss_curve(self, job_id: str) -> list[LossPoint]:
        self.get(job_id)  # NotFound for an unknown job
        return self._store.loss_curve(job_id)

    def counts(self) -> dict[str, int]:
        """Jobs by state, for metrics."""
        return self._store.count_by_state()

    def _finish(self, job: Job, state: JobState, error: JobFailure | None) -> None:
        if job.started_at is not None:
            self._observer.job_finished(state=state.value, seconds=time.time() - job.started_at)
        if (checkpoints := self._checkpoint_dir(job.id)) is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)  # only an unfinished job resumes
        with self._cond:
            job.state, job.error, job.finished_at = state, error, time.time()
            self._store.update(job)
            if self._running is not None and self._running.id == job.id:
                self._running = None
        log.info("job %s %s", job.id, state.value)

    # --- helpers

    def _load_rows(self, request: TrainRequest) -> tuple[DatasetFormat, list[Row]]:
        limits = self._limits
        if (request.rows is None) == (request.dataset_path is None):
            raise InvalidArgument(
                "dataset: give inline rows or a path, exactly one", field="dataset"
            )
        if request.dataset_path is not None:
            path = resolve_dataset_path(request.dataset_path, limits.dataset_roots)
            raw = read_jsonl(
                path, max_bytes=limits.max_dataset_bytes, max_rows=limits.max_dataset_rows
            )
            prefix = "dataset.path"
        else:
            assert request.rows is not None
            raw, prefix = list(request.rows), "dataset.inline.rows"
        return validate_rows(raw, field_prefix=prefix, max_rows=limits.max_dataset_rows)

    def _check_adapter_id_free(self, adapter_id: str) -> None:
        if self._registry.exists(adapter_id):
            raise AlreadyExists(f"adapter {adapter_id!r} already exists", field="adapter_id")
        for job in self._store.in_states(JobState.QUEUED, JobState.RUNNING):
            if job.spec.adapter_id == adapter_id:
                raise AlreadyExists(
                    f"job {job.id} is already training adapter {adapter_id!r}",
                    field="adapter_id",
                )

    def _by_request_id(self, request_id: str, fingerprint: str) -> Job | None:
        """The job already made for this idempotency key, if any; AlreadyExists when that
        job was made for another request. Call under the lock."""
        if not request_id:
            return None
        job = self._store.find_by_request_id(request_id)
        if job is None:
            return None
        if job.spec.request_fingerprint and job.spec.request_fingerprint != fingerprint:
            raise AlreadyExists(
                f"request_id: {shown(request_id)} was used for another request (job {job.id}); "
                "a retry must repeat the request unchanged, a new request needs a new id",
                field="request_id",
            )
        return self.get(job.id)

    def _snapshot_path(self, job_id: str, split: str = "train") -> Path:
        suffix = "" if split == "train" else f".{split}"
        return self._datasets_dir / f"{job_id}{suffix}.jsonl"

    def _checkpoint_dir(self, job_id: str) -> Path | None:
        return self._checkpoints_dir / job_id if self._checkpoints_dir is not None else None

    def _parent(self, spec: JobSpec) -> AdapterInfo:
        """A continued adapter keeps its parent's shape; the parent must fit this base and
        have been trained for the same task."""
        parent_id = spec.parent_adapter_id
        try:
            parent = self._registry.get(parent_id)
        except NotFound:
            raise NotFound(
                f"parent_adapter_id: adapter {parent_id!r} not found", field="parent_adapter_id"
            ) from None
        if parent.base_model != self._base_model:
            raise FailedPrecondition(
                f"parent_adapter_id: {parent_id!r} was trained on {parent.base_model}, "
                f"not {self._base_model}",
                field="parent_adapter_id",
            )
        if parent.task != spec.task.value:
            raise FailedPrecondition(
                f"parent_adapter_id: {parent_id!r} was trained for {parent.task}, "
                f"not {spec.task.value}",
                field="parent_adapter_id",
            )
        return parent

    def _continue_from(self, spec: JobSpec, parent: AdapterInfo, request: TrainRequest) -> JobSpec:
        """A continued adapter has its parent's shape: LoRA settings given that differ from
        the parent's are refused (not silently dropped), and training settings left unset
        are the parent job's, not the defaults."""
        source = self._store.get(parent.source_job_id) if parent.source_job_id else None
        lora = LoraSpec(
            r=parent.r,
            alpha=parent.alpha,
            dropout=parent.dropout,
            target_modules=parent.target_modules,
            use_rslora=source.spec.lora.use_rslora if source is not None else False,
            use_dora=parent.use_dora,
        )
        given = request.lora
        for name in sorted(request.lora_given):
            ours, theirs = getattr(given, name), getattr(lora, name)
            if name == "target_modules":
                ours, theirs = sorted(ours), sorted(theirs)
            if ours != theirs:
                raise FailedPrecondition(
                    f"lora.{name}: the parent adapter {parent.id} has {theirs!r}, and a "
                    f"continued adapter keeps its parent's shape; leave lora.{name} unset "
                    "or give the parent's value",
                    field=f"lora.{name}",
                )
        training = spec.training
        if source is not None:
            inherited = {
                name: getattr(source.spec.training, name)
                for name in INHERITED_TRAINING
                if name not in request.training_given
            }
            training = dataclasses.replace(training, **inherited)
        return dataclasses.replace(spec, lora=lora, training=training).validate()

    def _check_target_modules(self, names: tuple[str, ...]) -> None:
        """Each target module names a layer of the base model (as peft matches them: the
        whole name, or its last dotted parts), or the job would queue and fail later."""
        layers = self._layer_names()
        if not names or names == ("default",) or not layers:
            return
        problems = []
        for i, name in enumerate(names):
            if not any(layer == name or layer.endswith("." + name) for layer in layers):
                leaves = sorted({layer.rsplit(".", 1)[-1] for layer in layers if layer})
                problems.append(
                    InvalidArgument(
                        f"lora.target_modules[{i}]: {shown(name)} matches no layer of the base "
                        f"model; its layers include {', '.join(leaves[:24])}",
                        field=f"lora.target_modules[{i}]",
                    )
                )
        collect(problems)

    def _check_chat_template(self, template: str, messages: list[dict[str, str]]) -> None:
        """Chat rows need a template that renders; checked now, not at training time."""
        if not template and not self._base_chat_template():
            raise InvalidArgument(
                "chat_template: the base model's tokenizer has no chat template; give one",
                field="chat_template",
            )
        if len(template) > MAX_CHAT_TEMPLATE_CHARS:
            raise InvalidArgument(
                f"chat_template: {len(template)} characters is over the limit of "
                f"{MAX_CHAT_TEMPLATE_CHARS}",
                field="chat_template",
            )
        if template:
            # Rendered in a worker process under time, memory and output bounds, as
            # transformers renders it: a template is a program, never run on our threads.
            self._chat_renderer.check(
                template, messages, special_tokens=self._base_special_tokens()
            )

    def _labels(
        self,
        request: TrainRequest,
        dataset_format: DatasetFormat,
        rows: list[Row],
        validation: list[Row],
        parent: AdapterInfo | None,
    ) -> tuple[str, ...]:
        """Classification needs labelled rows and fixes the label order of the head."""
        labelled = dataset_format is DatasetFormat.LABELLED
        if request.task is not Task.CLASSIFICATION:
            if request.labels:
                raise InvalidArgument(
                    "labels: only sequence classification jobs take labels; set the task, "
                    "or leave labels empty",
                    field="labels",
                )
            if labelled:
                raise InvalidArgument(
                    "task: the rows have labels; set the task to sequence classification",
                    field="task",
                )
            return ()
        if not labelled:
            raise InvalidArgument(
                "dataset: sequence classification needs rows of text and label",
                field="dataset",
            )
        if parent is not None:
            labels = parent.labels
        else:
            labels = tuple(request.labels) or tuple(sorted({r["label"] for r in rows}))
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise InvalidArgument(
                f"labels: need at least two distinct labels, got {list(labels)}", field="labels"
            )
        known = set(labels)
        train_prefix = "dataset.path" if request.dataset_path is not None else "dataset.inline.rows"
        val_prefix = (
            "validation.path" if request.validation_path is not None else "validation.inline.rows"
        )
        for prefix, split_rows in ((train_prefix, rows), (val_prefix, validation)):
            for index, row in enumerate(split_rows):
                if row["label"] not in known:
                    raise InvalidArgument(
                        f"{prefix}[{index}].label: {row['label']!r} is not one of {list(labels)}",
                        field=f"{prefix}[{index}].label",
                        row=index,
                    )
        return labels

    def _split_validation(
        self,
        request: TrainRequest,
        spec: JobSpec,
        dataset_format: DatasetFormat,
        rows: list[Row],
    ) -> tuple[list[Row], list[Row]]:
        """Given validation rows, or `eval_fraction` of the rows held out (seeded)."""
        limits = self._limits
        if request.validation_rows is not None or request.validation_path is not None:
            if request.validation_path is not None:
                path = resolve_dataset_path(
                    request.validation_path, limits.dataset_roots, field="validation.path"
                )
                raw = read_jsonl(
                    path,
                    max_bytes=limits.max_dataset_bytes,
                    max_rows=limits.max_dataset_rows,
                    field="validation.path",
                )
                prefix = "validation.path"
            else:
                assert request.validation_rows is not None
                raw, prefix = list(request.validation_rows), "validation.inline.rows"
            form, validation = validate_rows(
                raw, field_prefix=prefix, max_rows=limits.max_dataset_rows
            )
            if form is not dataset_format:
                raise InvalidArgument(
                    f"{prefix}: {form.value} rows, but the training rows are "
                    f"{dataset_format.value} rows",
                    field=prefix,
                )
            return rows, validation
        fraction = spec.training.eval_fraction
        if fraction <= 0:
            return rows, []
        held = max(1, round(len(rows) * fraction))
        if held >= len(rows):
            raise InvalidArgument(
                f"training.eval_fraction: {fraction} of {len(rows)} rows leaves none to train on",
                field="training.eval_fraction",
            )
        order = list(range(len(rows)))
        random.Random(spec.training.seed).shuffle(order)
        held_out = set(order[:held])
        return (
            [r for i, r in enumerate(rows) if i not in held_out],
            [r for i, r in enumerate(rows) if i in held_out],
        )


DISK_FULL_FREE_BYTES = 64 * 1024 * 1024


def disk_full(error: BaseException) -> ResourceExhausted:
    return ResourceExhausted(
        f"the server's disk is full ({error}); free space or retry on another replica",
        retry_after_s=60.0,
        reason="DISK_FULL",
    )


def _is_disk_full(error: BaseException, directory: Path) -> bool:
    """ENOSPC anywhere in the chain, or a failed write (torch's zip writer says only "file
    write failed") while the data volume has almost no space left."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if "write" not in str(error).lower():
        return False
    try:
        return shutil.disk_usage(directory).free < DISK_FULL_FREE_BYTES
    except OSError:
        return False
