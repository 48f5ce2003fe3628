"""The training worker: claims jobs from the shared store and runs them, one at a time, on
any replica whose role trains. Nothing is held in one process's memory that another
replica needs:

- a job is claimed from the store (`JobStore.claim`), leased, and its lease renewed by a
  heartbeat thread every third of the lease; a cancel asked on any replica reaches the
  worker through that heartbeat;
- every write the worker makes presents the claim's fence; once a write says the lease is
  lost (`LeaseLost`: the replica stalled past its lease and another one took the job), the
  worker stops and writes nothing more;
- the dataset snapshot and the checkpoints live in the artifact store, so the replica that
  claims a job whose worker died resumes it from its last checkpoint;
- the adapter is uploaded, then published by the transaction that marks the job
  SUCCEEDED (`AdapterRegistry.register(..., job=...)`): exactly once, never half.

A job started `max_job_attempts` times without ending (its workers kept dying) is FAILED
(INTERRUPTED) when next claimed, rather than crash-looping replicas."""

from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from tuneserve import failpoints
from tuneserve.data.rows import Row, read_snapshot
from tuneserve.errors import AlreadyExists, InvalidArgument, ResourceExhausted, Unavailable
from tuneserve.jobs.model import Job, JobFailure, JobSpec, JobState, Progress
from tuneserve.jobs.store import JobStore, LeaseLost, LossPoint
from tuneserve.logs import job_id_var
from tuneserve.registry import AdapterInfo, AdapterRegistry
from tuneserve.storage.artifacts import ArtifactStore
from tuneserve.torch_threads import run_in_own_thread

log = logging.getLogger(__name__)

PERSIST_EVERY_S = 1.0  # the job row's progress; loss points are written every step
IDLE_POLL_S = 1.0  # between claims when the queue is empty (a local submit wakes it)
RETRY_S = 1.0  # after a failed claim or bookkeeping write (the store unreachable)
HEARTBEAT_RETRY_S = 1.0  # after a failed heartbeat
TRAIN_FILE, VALIDATION_FILE = "train.jsonl", "validation.jsonl"


def dataset_key(job_id: str) -> str:
    return f"datasets/{job_id}"


def checkpoint_prefix(job_id: str) -> str:
    return f"checkpoints/{job_id}"


class Trainer(Protocol):
    """Trains one job's adapter into `output_dir`; raises StopTraining when told to stop.
    Calls `on_checkpoint` with each resumable checkpoint directory it completes."""

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
        on_checkpoint: Callable[[Path], None],
    ) -> Any: ...


class JobObserver(Protocol):
    """Receives the worker's events (tuneserve.metrics.Metrics implements it)."""

    def job_progress(
        self, *, steps: int, tokens: int, loss: float, tokens_per_second: float
    ) -> None: ...

    def job_finished(self, *, state: str, seconds: float) -> None: ...


class _NoObserver:
    def job_progress(self, **_: Any) -> None:
        pass

    def job_finished(self, **_: Any) -> None:
        pass


class _Stop(Exception):
    """The claim is gone: stop without writing anything more."""


class Worker:
    """Thread-safe. `running` is the job this replica runs now (a copy is what readers get)."""

    def __init__(
        self,
        *,
        store: JobStore,
        registry: AdapterRegistry,
        artifacts: ArtifactStore,
        trainer: Trainer,
        work_dir: Path,
        worker_id: str,
        lease_s: float,
        max_job_attempts: int,
        observer: JobObserver | None = None,
        before_training_step: Callable[[], None] = lambda: None,
        on_adapter_registered: Callable[[AdapterInfo], None] = lambda info: None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._artifacts = artifacts
        self._trainer = trainer
        self._work_dir = work_dir
        self.worker_id = worker_id
        self._lease_s = lease_s
        self._max_attempts = max_job_attempts
        self._observer: JobObserver = observer or _NoObserver()
        self._before_step = before_training_step
        self._on_registered = on_adapter_registered
        self._cond = threading.Condition()
        self.running: Job | None = None
        self._cancel = False  # asked on this replica or seen by the heartbeat
        self._lost = False  # the lease is gone
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle

    def start(self) -> None:
        """A replica restarted under the same id: its previous process's leases are void."""
        shutil.rmtree(self._work_dir, ignore_errors=True)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        if expired := self._store.expire_leases(self.worker_id):
            log.info("%d job(s) of this replica's previous process will be resumed", expired)
        for job_id in self._store.ended_with_checkpoints():  # a replica died cleaning up
            self._drop_checkpoints(job_id)
        self._thread = threading.Thread(target=self._loop, name="job-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the running job (checkpointed, back in the queue) and the loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """A job was queued on this replica: claim now rather than at the next poll."""
        with self._cond:
            self._cond.notify_all()

    def cancel_running(self, job_id: str) -> None:
        with self._cond:
            if self.running is not None and self.running.id == job_id:
                self._cancel = True

    def eta_seconds(self) -> float:
        running = self.running
        return running.progress.eta_seconds if running is not None else 0.0

    # --- the loop

    def _loop(self) -> None:
        """Nothing a job does may end it: a failed claim or bookkeeping write (the store
        unreachable, its disk full) is logged and retried, never the end of training."""
        while not self._stopping:
            try:
                job = self._store.claim(self.worker_id, self._lease_s)
            except Exception as e:
                log.warning("job worker: cannot claim a job (%s); retrying", e)
                self._idle(RETRY_S)
                continue
            if job is None:
                self._idle(IDLE_POLL_S)
                continue
            try:
                self._take(job)
            except Exception:
                log.exception("job worker: job %s's bookkeeping failed; going on", job.id)
                self._idle(RETRY_S)
            finally:
                with self._cond:
                    self.running = None

    def _idle(self, seconds: float) -> None:
        with self._cond:
            if not self._stopping:
                self._cond.wait(seconds)

    def _take(self, job: Job) -> None:
        job_id_var.set(job.id)
        if job.attempts > self._max_attempts:
            interrupted = job.attempts - 1
            log.warning("job %s was interrupted %d times; failing it", job.id, interrupted)
            self._finish(
                job,
                JobState.FAILED,
                JobFailure(
                    code="INTERRUPTED",
                    message=f"the replica running this job stopped {interrupted} times",
                ),
            )
            return
        job.progress = Progress()
        with self._cond:
            self.running, self._cancel, self._lost = job, False, False
        ended = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(job, ended), name="job-lease", daemon=True
        )
        beat.start()
        try:
            # A thread of its own, which ends with the job: see torch_threads.py.
            run_in_own_thread(lambda: self._run(job), name=f"job-{job.id}")
        finally:
            ended.set()
            with self._cond:
                self.running = None
                self._cond.notify_all()
            beat.join()

    def _heartbeat(self, job: Job, ended: threading.Event) -> None:
        """Renew the lease every third of it until the job ends here."""
        wait = self._lease_s / 3
        while not ended.wait(wait):
            try:
                if self._store.heartbeat(job.id, job.fence, self._lease_s):
                    self._cancel = True
                wait = self._lease_s / 3
            except LeaseLost:
                if not self._ended_by_me(job):
                    log.warning("job %s: lease lost; another replica has it now", job.id)
                    self._lost = True
                return
            except Exception as e:
                # The store unreachable or slow: the lease runs on meanwhile, so try again
                # soon rather than a third of a lease later, when it may have expired.
                log.warning("job %s: heartbeat failed (%s)", job.id, e)
                wait = min(HEARTBEAT_RETRY_S, self._lease_s / 3)

    def _ended_by_me(self, job: Job) -> bool:
        """This claim ended the job (the heartbeat raced its last write)."""
        try:
            current = self._store.get(job.id)
        except Exception:
            return False
        return current is not None and current.state.final and current.fence == job.fence

    def _run(self, job: Job) -> None:
        from tuneserve.training.recipe import StopTraining  # torch only where jobs run

        job_dir = self._work_dir / f"{job.id}-{job.fence}"
        shutil.rmtree(job_dir, ignore_errors=True)
        checkpoints = job_dir / "checkpoints"
        checkpoints.mkdir(parents=True)
        staging = self._registry.staging_dir()
        log.info("job %s started (attempt %d)", job.id, job.attempts)
        log.debug("job %s holds fence %d on %s", job.id, job.fence, self.worker_id)
        try:
            rows, validation = self._dataset(job, job_dir)
            if job.checkpoint:  # the last worker's progress: resume there
                step = job.checkpoint.rsplit("-", 1)[-1]
                self._artifacts.get_dir(job.checkpoint, checkpoints / f"step-{step}")
            parent = job.spec.parent_adapter_id
            result = self._trainer(
                spec=job.spec,
                rows=rows,
                output_dir=staging,
                on_progress=self._progress_writer(job),
                should_stop=self._should_stop,
                validation_rows=validation,
                parent_adapter_dir=self._parent_files(parent, job_dir) if parent else None,
                checkpoint_dir=checkpoints,
                on_checkpoint=lambda path: self._commit_checkpoint(job, path),
            )
            if self._lost:
                raise _Stop
            job.samples = list(result.samples)
            job.state, job.error, job.finished_at = JobState.SUCCEEDED, None, time.time()
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
                job=job,
            )
            failpoints.hit("job.published")
            self._ended(job, JobState.SUCCEEDED)
            failpoints.hit("job.succeeded")
            self._on_registered(info)
        except (LeaseLost, _Stop):
            log.warning("job %s: stopped without writing; its lease is another's", job.id)
        except StopTraining:
            if self._lost:
                log.warning("job %s: stopped; its lease is another's", job.id)
            elif self._cancel:
                self._finish(job, JobState.CANCELLED, None)
            else:  # shutting down: another replica, or this one restarted, resumes it
                log.info("job %s stopped by shutdown; it will run again", job.id)
                self._store.release(job)
        except (InvalidArgument, AlreadyExists) as e:
            code = "INVALID_DATASET" if isinstance(e, InvalidArgument) else "ADAPTER_EXISTS"
            failure = JobFailure(code=code, message=e.message, field=e.field, row=e.row)
            self._finish(job, JobState.FAILED, failure)
        except Unavailable as e:
            # Object storage or the store unreachable: the job goes back to the queue (not
            # counted as an attempt) to resume from its checkpoint; if the store cannot
            # take it back either, it is left to its lease, with the same outcome later.
            log.warning("job %s: shared storage unreachable (%s); it will be resumed", job.id, e)
            try:
                self._store.release(job)
            except Exception as again:
                log.warning("job %s: left to its lease (%s)", job.id, again)
        except Exception as e:
            if _is_disk_full(e, self._work_dir):
                log.error("job %s failed: the disk is full (%s)", job.id, e)
                failure = JobFailure(code="DISK_FULL", message=disk_full(e).message)
            else:
                log.exception("job %s failed", job.id)
                failure = JobFailure(code="TRAINING_FAILED", message=f"{type(e).__name__}: {e}")
            self._finish(job, JobState.FAILED, failure)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(job_dir, ignore_errors=True)

    def _dataset(self, job: Job, job_dir: Path) -> tuple[list[Row], list[Row]]:
        key = dataset_key(job.id)
        directory = self._artifacts.local_path(key)
        if directory is None:
            directory = job_dir / "dataset"
            self._artifacts.get_dir(key, directory)
        validation = directory / VALIDATION_FILE
        return (
            read_snapshot(directory / TRAIN_FILE),
            read_snapshot(validation) if validation.exists() else [],
        )

    def _parent_files(self, parent: str, job_dir: Path) -> Path:
        """The parent adapter's files, the job's own for its whole run: a copy in the
        cache could be evicted by generation before the trainer reads it."""
        record = self._registry.record(parent)
        local = self._artifacts.local_path(record.key)
        if local is not None:
            return local
        directory = job_dir / "parent"
        self._artifacts.get_dir(record.key, directory)
        return directory

    def _should_stop(self) -> bool:
        if self._cancel or self._stopping or self._lost:
            return True
        self._before_step()  # the co-serving policy (tuneserve.coserving)
        return self._cancel or self._stopping or self._lost

    def _progress_writer(self, job: Job) -> Callable[[Progress], None]:
        last_persist = 0.0

        def on_progress(progress: Progress) -> None:
            nonlocal last_persist
            if self._lost:
                return
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
            self._fenced(lambda: self._store.add_loss_points(job.id, job.fence, [point]))
            failpoints.hit("job.step")
            with self._cond:
                job.progress = dataclasses.replace(progress)
            now = time.monotonic()
            if now - last_persist >= PERSIST_EVERY_S or progress.step == progress.total_steps:
                last_persist = now
                self._fenced(lambda: self._store.save_progress(job))

        return on_progress

    def _commit_checkpoint(self, job: Job, path: Path) -> None:
        """Upload a completed checkpoint under a key of this claim, then record it: a
        stale worker's upload is never recorded, so never resumed from."""
        step = path.name.rsplit("-", 1)[-1]
        key = f"{checkpoint_prefix(job.id)}/{job.fence}-{step}"
        if key == job.checkpoint:  # this very checkpoint is kept already
            return
        self._artifacts.put_dir(key, path)
        previous = self._fenced(lambda: self._store.save_checkpoint(job.id, job.fence, key))
        job.checkpoint = key
        if previous and previous != key:
            try:  # superseded: its deletion is housekeeping, never the job's failure
                self._artifacts.delete(previous)
            except Exception as e:
                log.warning("job %s: old checkpoint %s not deleted (%s)", job.id, previous, e)

    def _fenced(self, write: Callable[[], Any]) -> Any:
        try:
            return write()
        except LeaseLost:
            self._lost = True
            raise _Stop from None

    def _finish(self, job: Job, state: JobState, error: JobFailure | None) -> None:
        job.state, job.error, job.finished_at = state, error, time.time()
        try:
            self._store.finish(job)
        except LeaseLost:
            log.warning("job %s: not marked %s; its lease is another's", job.id, state.value)
            return
        self._ended(job, state)

    def _ended(self, job: Job, state: JobState) -> None:
        if job.started_at is not None:
            self._observer.job_finished(state=state.value, seconds=time.time() - job.started_at)
        self._drop_checkpoints(job.id)  # only an unfinished job resumes
        log.info("job %s %s", job.id, state.value)

    def _drop_checkpoints(self, job_id: str) -> None:
        try:
            self._artifacts.delete(checkpoint_prefix(job_id))
            self._store.forget_checkpoint(job_id)
        except Exception as e:  # left for the next start's sweep
            log.warning("job %s: its checkpoints were not deleted (%s)", job_id, e)


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
