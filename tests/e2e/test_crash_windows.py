"""Crash windows (issue 18): `tuneserve serve` is killed at each boundary of a job's life by
its own failpoints (SIGKILL to itself, as `kill -9` would: no handler runs), 4 times per
boundary and 20 times in all, on one data directory per boundary; a last clean start then
finishes the work. Every job must end SUCCEEDED exactly once, never FAILED on the way, with a
loss point for every step, its adapter registered to it and generating.

The cost is process starts: each imports torch, transformers and peft (about 7 s of CPU),
and each boundary takes 5 (4 killed runs and the clean one), 25 in all; the jobs themselves
are 8 steps of 2 rows. The file takes about 175 s of CPU: 5 to 9 minutes measured on 2 cores
shared with other work, about 3 on free ones (a boundary took 37 s in a quiet spell)."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import grpc
import pytest

from tests.support import ServerProcess, vader_rows
from tuneserve_client import FINAL_STATES, ClientError, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 8
ROWS = vader_rows()
PROMPT = "Question: Who is your father? Answer:"
# A job is started again by every process that finds it unfinished; the step and checkpoint
# scenarios start theirs 5 times (4 kills, then the clean run), and the default of 3 would
# fail it INTERRUPTED by design at its 4th start. Interruptions are what is tested here.
MAX_JOB_ATTEMPTS = 10


def training(*, checkpoint_every: int) -> pb.TrainingConfig:
    return pb.TrainingConfig(
        max_steps=STEPS, batch_size=2, seed=7, checkpoint_every_steps=checkpoint_every
    )


def submit(client: TuneserveClient, request_id: str, *, checkpoint_every: int = 1) -> pb.Job:
    """TrainJob; a retry repeats the same request_id with the same body."""
    return client.train(
        rows=ROWS,
        adapter_id=request_id,
        training=training(checkpoint_every=checkpoint_every),
        request_id=request_id,
    )


class CrashingServer(ServerProcess):
    """`tuneserve serve` with failpoints armed. It may kill itself as soon as its job worker
    starts, even before a client has seen it SERVING, so start-up waits for either."""

    def __init__(self, model: Path, data: Path, failpoints: str = "") -> None:
        armed = ["--failpoints", failpoints] if failpoints else []
        self._spawn(model, data, "--max-job-attempts", str(MAX_JOB_ATTEMPTS), *armed)
        self.client = TuneserveClient(self.target)
        deadline = time.monotonic() + 120
        while self.proc.poll() is None:
            try:
                self.client.wait_ready(timeout=0.5)
                return
            except TimeoutError:
                assert time.monotonic() < deadline, "server not SERVING:\n" + self.log

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def finished(self, job_id: str) -> pb.Job:
        """The job once it has ended; a failure with the log if the process dies first."""
        deadline = time.monotonic() + 120
        while True:
            try:
                job = self.client.get_status(job_id)
            except ClientError:
                if self.proc.poll() is None:  # retried for seconds: a death is seen
                    raise
                pytest.fail(f"the server died before job {job_id} ended:\n{self.log}")
            if job.state in FINAL_STATES:
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.1)

    def killed_at(self, failpoint: str) -> None:
        """Wait for the process to SIGKILL itself at `failpoint`; its log is then whole."""
        self.client.close()
        assert self.proc.wait(120) == -signal.SIGKILL, self.log
        self._reader.join(10)
        assert f"failpoint {failpoint}: killing the process" in self.log, self.log

    def end(self) -> None:
        """Kill the last, clean run once it has been checked; its log is then whole."""
        self.client.close()
        self.proc.kill()
        self.proc.wait(60)
        self._reader.join(10)


class Scenario:
    """The runs of one server on one data directory."""

    def __init__(self, model: Path, data: Path, processes: list[ServerProcess]) -> None:
        self.model, self.data, self.processes = model, data, processes

    def start(self, failpoints: str = "") -> CrashingServer:
        server = CrashingServer(self.model, self.data, failpoints)
        self.processes.append(server)
        return server


def assert_each_succeeded_once(
    server: CrashingServer, data: Path, jobs: dict[str, pb.Job]
) -> list[pb.Job]:
    """`jobs`: request_id -> the job first returned for it. Each ends SUCCEEDED, the only
    job of its request, with a full loss curve and a registered adapter that generates. All
    jobs here train the same rows with the same seed, so however often a job was interrupted
    and resumed, its curve is the one an uninterrupted run draws."""
    client = server.client
    finished = [server.finished(job.id) for job in jobs.values()]
    listed = sorted((j.request_id, j.id) for j in client.list_jobs())
    assert listed == sorted((r, j.id) for r, j in jobs.items()), "a job was lost or doubled"
    adapters = sorted(a.id for a in client.list_adapters())
    assert adapters == sorted(j.adapter_id for j in jobs.values())
    curves: list[list[float]] = []
    for job in finished:
        assert job.state == pb.JOB_STATE_SUCCEEDED, (job, server.log)
        assert not job.HasField("error"), job.error  # never FAILED on the way
        assert (job.progress.step, job.progress.total_steps) == (STEPS, STEPS)
        curve = client.loss_curve(job.id)
        assert [p.step for p in curve] == list(range(1, STEPS + 1)), curve
        assert all(math.isfinite(p.loss) and p.loss > 0 for p in curve), curve
        curves.append([p.loss for p in curve])
        adapter = client.get_adapter(job.adapter_id)
        assert adapter.source_job_id == job.id and adapter.steps == STEPS
        assert adapter.final_loss == pytest.approx(curve[-1].loss, rel=1e-6)
        out = client.generate(PROMPT, adapter_id=job.adapter_id, greedy=True, max_new_tokens=4)
        assert out.generated_tokens >= 1
        checkpoints = data / "artifacts" / "checkpoints" / job.id
        assert not checkpoints.exists(), "a finished job's checkpoints"
    for losses in curves[1:]:
        assert losses == pytest.approx(curves[0], rel=1e-5), curves
    return finished


def test_killed_when_queued_the_retry_finds_the_one_job(
    tiny_gpt2: Path, tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """TrainJob dies after the job row is written, before the caller is answered: the caller
    sees UNAVAILABLE, and its retry (same request_id, same body) after the restart gets that
    job. A kill may also interrupt a job queued by an earlier run, often training by then."""
    runs = Scenario(tiny_gpt2, tmp_path, processes)
    jobs: dict[str, pb.Job] = {}
    previous = None
    for n in range(4):
        server = runs.start("job.queued=1")
        if previous is not None:
            jobs[previous] = submit(server.client, previous)
        previous = f"queued-{n}"
        with TuneserveClient(server.target, retry=None) as once, pytest.raises(ClientError) as e:
            submit(once, previous)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        server.killed_at("job.queued")
    assert previous is not None
    final = runs.start()
    jobs[previous] = submit(final.client, previous)
    for request_id, job in jobs.items():  # every retry, again: still the one job
        assert submit(final.client, request_id).id == job.id
    assert_each_succeeded_once(final, tmp_path, jobs)


def test_killed_mid_step_resumes_with_the_whole_curve(
    tiny_gpt2: Path, tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """Killed after a step's loss point is written, checkpoints every 2 steps: at step 1 (no
    checkpoint yet), at step 3 (just after checkpoint 2), at step 4 (its checkpoint not yet
    written: back to 2) and at the last step (back to 6). A job that never stopped, trained
    in the last run, draws the reference curve."""
    runs = Scenario(tiny_gpt2, tmp_path, processes)
    server = runs.start("job.step=1")
    job = submit(server.client, "mid-step", checkpoint_every=2)
    server.killed_at("job.step")
    # Hits count the steps each process trains: it resumes after its job's last checkpoint.
    for armed in ("job.step=3", "job.step=2", "job.step=6"):
        runs.start(armed).killed_at("job.step")
    final = runs.start()
    reference = submit(final.client, "reference", checkpoint_every=2)  # never interrupted
    (done, _) = assert_each_succeeded_once(
        final, tmp_path, {"mid-step": job, "reference": reference}
    )
    assert done.progress.resumed_from_step == 6
    final.end()
    assert f"job {job.id} started (attempt 5)" in final.log


def test_killed_writing_a_checkpoint_resumes_from_the_last_whole_one(
    tiny_gpt2: Path, tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """Killed with a checkpoint fully written to its temporary directory, not yet renamed:
    the first of a fresh run (none to resume from), the 3rd (back to 2), the first after a
    resume (still back to 2) and the last the job writes, 7 (back to 6). A job that never
    stopped, trained in the last run, draws the reference curve."""
    runs = Scenario(tiny_gpt2, tmp_path, processes)
    server = runs.start("checkpoint.write=1")
    job = submit(server.client, "checkpoint")
    server.killed_at("checkpoint.write")
    for armed in ("checkpoint.write=3", "checkpoint.write=1", "checkpoint.write=5"):
        runs.start(armed).killed_at("checkpoint.write")
    final = runs.start()
    reference = submit(final.client, "reference")  # never interrupted
    (done, _) = assert_each_succeeded_once(
        final, tmp_path, {"checkpoint": job, "reference": reference}
    )
    assert done.progress.resumed_from_step == 6
    final.end()
    assert f"job {job.id} started (attempt 5)" in final.log


@pytest.mark.parametrize("failpoint", ["job.published", "job.succeeded"])
def test_killed_after_publishing_the_job_finishes_once(
    failpoint: str, tiny_gpt2: Path, tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """Killed right after the adapter was published, which the same transaction made the
    job SUCCEEDED (job.published), or with the after-success work not done (job.succeeded):
    one job per run, each killed there; the next process finds it finished and never trains
    it again."""
    runs = Scenario(tiny_gpt2, tmp_path, processes)
    jobs: dict[str, pb.Job] = {}
    previous: pb.Job | None = None
    for n in range(5):
        server = runs.start(failpoint if n < 4 else "")
        if previous is not None:  # finished first thing, before any new work
            after = server.finished(previous.id)
            assert after.state == pb.JOB_STATE_SUCCEEDED, (after, server.log)
        if n < 4:
            request_id = f"{failpoint.replace('.', '-')}-{n}"
            job = jobs[request_id] = submit(server.client, request_id)
            server.killed_at(failpoint)
        else:
            assert_each_succeeded_once(server, tmp_path, jobs)
            server.end()
        if previous is not None:
            assert f"job {previous.id} started" not in server.log, "trained again"
        previous = job
