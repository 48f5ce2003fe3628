"""Training jobs as callers see them: TrainJob validates a request and its dataset, keeps
a snapshot of the rows in the artifact store and queues the job in the shared store; every
replica answers GetStatus, ListJobs and CancelJob from that store. Replicas whose role
trains run a `Worker` (worker.py) that claims queued jobs from the store, so a job queued on
any replica runs on whichever has room, and one whose replica died resumes on another.

States move QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED. A job this replica runs
is read from its worker's memory (progress exact to the step); any other from the store,
where the worker writes progress at most once a second."""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneserve import failpoints
from tuneserve.data.chat_template import TemplateRenderer, shared_renderer
from tuneserve.data.preparation import DatasetLimits, DatasetPreparer
from tuneserve.data.rows import (
    Row,
    write_snapshot,
)
from tuneserve.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    collect,
    shown,
)
from tuneserve.jobs.model import (
    DatasetFormat,
    Job,
    JobSpec,
    JobState,
    LoraSpec,
    Task,
    TrainingSpec,
)
from tuneserve.jobs.store import JobStore, LossPoint
from tuneserve.jobs.worker import TRAIN_FILE, VALIDATION_FILE, Worker, dataset_key, disk_full
from tuneserve.registry import AdapterInfo, AdapterRegistry
from tuneserve.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)


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
    "packing",
)


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
        artifacts: ArtifactStore,
        base_model: str,
        limits: Limits,
        worker: Worker | None = None,
        base_chat_template: Callable[[], str | None] = lambda: None,
        layer_names: Callable[[], Sequence[str] | None] = lambda: None,
        chat_renderer: TemplateRenderer | None = None,
        base_special_tokens: Callable[[], Mapping[str, str]] = lambda: {},
    ) -> None:
        """`worker`: this replica trains (role all or train); None: it only queues."""
        self._store = store
        self._registry = registry
        self._artifacts = artifacts
        self._worker = worker
        self._base_model = base_model
        self._limits = limits
        self._layer_names = layer_names
        self._datasets = DatasetPreparer(
            limits=DatasetLimits(
                dataset_roots=limits.dataset_roots,
                max_dataset_rows=limits.max_dataset_rows,
                max_dataset_bytes=limits.max_dataset_bytes,
            ),
            chat_renderer=chat_renderer or shared_renderer(),
            base_chat_template=base_chat_template,
            base_special_tokens=base_special_tokens,
        )
        self._cond = threading.Condition()
        self._accepting = True

    # --- lifecycle

    def start(self) -> None:
        if self._worker is not None:
            self._worker.start()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the running job (it goes back to the queue) and the worker."""
        self.stop_accepting()
        if self._worker is not None:
            self._worker.stop(timeout)

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
        dataset = self._datasets.prepare(
            request,
            eval_fraction=spec.training.eval_fraction,
            seed=spec.training.seed,
            parent_labels=parent.labels if parent is not None else None,
        )
        dataset_format, rows, validation = dataset.format, dataset.rows, dataset.validation
        labels = dataset.labels
        spec = dataclasses.replace(
            spec,
            dataset_format=dataset_format,
            dataset_rows=len(rows),
            validation_rows=len(validation),
            labels=labels,
            chat_template=request.chat_template,
        )
        job = Job(id=job_id, spec=spec)
        if first := self._by_request_id(request.request_id, fingerprint):
            return first
        self._check_adapter_id_free(spec.adapter_id)
        key = dataset_key(job_id)
        try:
            self._snapshot(key, rows, validation)  # large: not under the lock
            with self._cond:
                self._check_room(request.caller)
                stored = self._store.insert(job)  # the store settles a race between replicas
        except BaseException as e:
            # Unavailable: the insert may have committed with its answer lost, so the rows
            # stay for the job that may exist (a retry with the request_id finds it).
            if not isinstance(e, Unavailable):
                self._forget(key)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(e) from None
            raise
        if stored.id != job_id:  # a racing retry of the same request queued it first
            self._forget(key)
            return self._check_same_request(stored, fingerprint)
        if self._worker is not None:
            self._worker.wake()
        failpoints.hit("job.queued")
        log.info("job %s queued: %d rows -> adapter %s", job_id, len(rows), spec.adapter_id)
        return self.get(job_id)

    def _snapshot(self, key: str, rows: list[Row], validation: list[Row]) -> None:
        """The validated rows, kept in the artifact store: the replica that runs the job,
        and any that resumes it, trains on exactly these."""
        with tempfile.TemporaryDirectory(prefix="snapshot-") as tmp:
            write_snapshot(rows, Path(tmp) / TRAIN_FILE)
            if validation:
                write_snapshot(validation, Path(tmp) / VALIDATION_FILE)
            self._artifacts.put_dir(key, Path(tmp))

    def _forget(self, key: str) -> None:
        try:
            self._artifacts.delete(key)
        except Exception as e:
            log.warning("dataset snapshot %s was not deleted (%s)", key, e)

    def _check_room(self, caller: str) -> None:
        """A bounded queue: past its size, or a caller's share of it, the caller is told to
        retry later (RESOURCE_EXHAUSTED with a hint), never queued without end. Replicas
        racing may overshoot the bound by one job each."""
        active = self._store.in_states(JobState.QUEUED, JobState.RUNNING)
        limits = self._limits
        retry_after = self._retry_after(active)
        if len(active) >= limits.max_queued_jobs:
            raise ResourceExhausted(
                f"{len(active)} training jobs are queued or running, the most this service "
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

    def _retry_after(self, active: list[Job]) -> float:
        """When a slot may free: the soonest running job's ETA, else a minute per job."""
        etas = [self.get(j.id).progress.eta_seconds for j in active if j.state is JobState.RUNNING]
        if eta := min((e for e in etas if e > 0), default=0.0):
            return float(min(max(eta, 5.0), 3600.0))
        return float(min(60.0 * max(len(active), 1), 3600.0))

    def get(self, job_id: str) -> Job:
        running = self._worker.running if self._worker is not None else None
        if running is not None and running.id == job_id:
            live = copy.deepcopy(running)
            # The worker sets a job's end in memory before the store commits it (with its
            # adapter): until then it is the store's RUNNING that is true.
            if live.state is JobState.RUNNING:
                return live
        job = self._store.get(job_id)
        if job is None:
            raise NotFound(f"job {shown(job_id)} not found", field="job_id")
        if job.state is JobState.QUEUED:
            job.queue_position = self._store.queue_position(job_id)
        return job

    def list_jobs(self, *, state: JobState | None, offset: int, limit: int) -> list[Job]:
        jobs = self._store.list(state=state, offset=offset, limit=limit)
        return [
            self.get(j.id) if j.state in (JobState.QUEUED, JobState.RUNNING) else j for j in jobs
        ]

    def cancel(self, job_id: str) -> Job:
        """A queued job ends at once; a running one stops at its next step, on whichever
        replica runs it (its worker sees the request at its next heartbeat)."""
        before = self.get(job_id)  # NotFound for an unknown job
        if before.state.final or self._store.cancel(job_id) is None:
            raise FailedPrecondition(
                f"job {job_id} is already {before.state.value}", field="job_id"
            )
        if self._worker is not None:
            self._worker.cancel_running(job_id)
        log.info("job %s cancel requested", job_id)
        return self.get(job_id)

    def loss_curve(self, job_id: str) -> list[LossPoint]:
        self.get(job_id)  # NotFound for an unknown job
        return self._store.loss_curve(job_id)

    def counts(self) -> dict[str, int]:
        """Jobs by state, for metrics."""
        return self._store.count_by_state()

    # --- helpers

    def _check_adapter_id_free(self, adapter_id: str) -> None:
        """Checked early, to refuse before reading a large dataset; the store checks the
        active jobs again when it inserts (a racing submit on another replica)."""
        if self._registry.exists(adapter_id):
            raise AlreadyExists(f"adapter {adapter_id!r} already exists", field="adapter_id")
        for job in self._store.in_states(JobState.QUEUED, JobState.RUNNING):
            if job.spec.adapter_id == adapter_id:
                raise AlreadyExists(
                    f"job {job.id} is already training adapter {adapter_id!r}",
                    field="adapter_id",
                )

    def _by_request_id(self, request_id: str, fingerprint: str) -> Job | None:
        """The job already made for this idempotency key, on any replica, if any;
        AlreadyExists when that job was made for another request."""
        if not request_id:
            return None
        job = self._store.find_by_request_id(request_id)
        return None if job is None else self._check_same_request(job, fingerprint)

    def _check_same_request(self, job: Job, fingerprint: str) -> Job:
        if job.spec.request_fingerprint and job.spec.request_fingerprint != fingerprint:
            raise AlreadyExists(
                f"request_id: {shown(job.spec.request_id)} was used for another request "
                f"(job {job.id}); a retry must repeat the request unchanged, a new request "
                "needs a new id",
                field="request_id",
            )
        return self.get(job.id)

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


def import_legacy_snapshots(directory: Path, store: JobStore, artifacts: ArtifactStore) -> int:
    """Dataset snapshots of the single-process releases (`<job>.jsonl` and
    `<job>.validation.jsonl` under `directory`) of jobs still to run move into the artifact
    store, where the worker reads them; each file is removed once stored. Returns how many
    jobs' snapshots moved."""
    moved = 0
    if not directory.is_dir():
        return moved
    for job in store.in_states(JobState.QUEUED, JobState.RUNNING):
        train = directory / f"{job.id}.jsonl"
        key = dataset_key(job.id)
        if not train.is_file() or artifacts.exists(key):
            continue
        validation = directory / f"{job.id}.validation.jsonl"
        with tempfile.TemporaryDirectory(prefix="snapshot-") as tmp:
            shutil.copyfile(train, Path(tmp) / TRAIN_FILE)
            if validation.is_file():
                shutil.copyfile(validation, Path(tmp) / VALIDATION_FILE)
            artifacts.put_dir(key, Path(tmp))
        train.unlink()
        validation.unlink(missing_ok=True)
        moved += 1
    return moved
