"""End to end, many replicas: a real PostgreSQL (tests/postgres.py), an S3-protocol server
over HTTP (tests/s3server.py) and three `tuneserve serve` processes with mixed roles, used
through the real client. Jobs submitted to any replica finish exactly once; a replica killed
mid-job loses nothing (another resumes it from its last checkpoint); every replica serves
the same adapters the same way; a delete on one is seen by all; PostgreSQL stopped for a few
seconds makes calls UNAVAILABLE meanwhile, and the replicas recover by themselves."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.postgres import PostgresServer, postgres_server
from tests.s3server import S3Endpoint, s3_endpoint  # noqa: F401
from tests.support import ServerProcess, vader_rows
from tuneserve_client import ClientError, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LEASE_S = 3


class Cluster:
    def __init__(self, model: Path, tmp: Path, pg: PostgresServer, s3: S3Endpoint) -> None:
        self.model, self.tmp, self.pg = model, tmp, pg
        self.db_url = pg.create_database()
        self.dbname = self.db_url.rsplit("/", 1)[-1]
        self.bucket = s3.make_bucket("scale")
        self.env = s3.env()
        self.replicas: dict[str, ServerProcess] = {}

    def start(self, name: str, role: str) -> ServerProcess:
        server = ServerProcess(
            self.model,
            self.tmp / name,
            *("--role", role, "--replica-id", name, "--lease-s", str(LEASE_S)),
            *("--job-store", self.db_url, "--artifact-store", f"s3://{self.bucket}/tuneserve"),
            env=self.env,
        )
        self.replicas[name] = server
        return server

    def sql(self, query: str, *args: object) -> list[tuple]:
        with self.pg.connect(self.dbname) as db:
            return db.execute(query, args).fetchall()

    def stop_all(self) -> None:
        for server in self.replicas.values():
            if server.proc.poll() is None:
                server.stop(signal.SIGKILL)


@pytest.fixture
def cluster(
    tiny_gpt2: Path,
    tmp_path: Path,
    s3_endpoint: S3Endpoint,  # noqa: F811
) -> Iterator[Cluster]:
    c = Cluster(tiny_gpt2, tmp_path, postgres_server(), s3_endpoint)
    try:
        yield c
    finally:
        c.stop_all()
        if not c.pg.running:
            c.pg.start()


def _train(server: ServerProcess, adapter_id: str, steps: int, every: int) -> pb.Job:
    return server.client.train(
        rows=vader_rows(),
        adapter_id=adapter_id,
        training=pb.TrainingConfig(
            max_steps=steps, batch_size=2, checkpoint_every_steps=every, seed=1
        ),
    )


def _wait_all(server: ServerProcess, job_ids: list[str], timeout: float = 400) -> list[pb.Job]:
    return [server.client.wait(j, poll_s=0.2, timeout=timeout) for j in job_ids]


def test_replicas_share_jobs_adapters_and_survive_a_kill_and_a_database_outage(
    cluster: Cluster,
) -> None:
    a = cluster.start("r-all", "all")
    b = cluster.start("r-serve", "serve")
    c = cluster.start("r-train", "train")

    # A long job, then five short ones submitted round the replicas.
    long = _train(b, "long", steps=240, every=10)
    deadline = time.monotonic() + 120
    while not cluster.sql("SELECT checkpoint FROM jobs WHERE id=%s AND checkpoint != ''", long.id):
        assert time.monotonic() < deadline, "the long job never checkpointed"
        time.sleep(0.1)
    short = [
        _train(server, f"short-{i}", steps=12, every=4).id
        for i, server in enumerate([a, b, c, a, b])
    ]

    # kill -9 the replica running the long job, once it has a checkpoint past step 20.
    while True:
        owner, checkpoint = cluster.sql(
            "SELECT lease_owner, checkpoint FROM jobs WHERE id=%s", long.id
        )[0]
        if checkpoint and int(checkpoint.rsplit("-", 1)[-1]) >= 20:
            break
        time.sleep(0.1)
    assert owner in ("r-all", "r-train")
    survivor = c if owner == "r-all" else a
    cluster.replicas[owner].stop(signal.SIGKILL)
    saved = int(checkpoint.rsplit("-", 1)[-1])

    jobs = _wait_all(b, [long.id, *short])
    assert [j.state for j in jobs] == [pb.JOB_STATE_SUCCEEDED] * 6, [j.error for j in jobs]
    done = jobs[0]
    assert done.progress.resumed_from_step >= saved
    assert done.progress.step == done.progress.total_steps == 240
    curve = b.client.loss_curve(long.id)
    assert [p.step for p in curve] == list(range(1, 241))  # every step once
    # Exactly once: each short job ran once, each adapter is indexed once.
    attempts = dict(cluster.sql("SELECT id, attempts FROM jobs"))
    assert all(attempts[j] == 1 for j in short), attempts
    assert attempts[long.id] == 2
    published = cluster.sql("SELECT id, source_job_id FROM adapters ORDER BY id")
    assert published == sorted(
        [("long", long.id)] + [(f"short-{i}", j) for i, j in enumerate(short)]
    )
    assert not cluster.sql("SELECT 1 FROM jobs WHERE checkpoint != '' AND state != 'SUCCEEDED'")

    # The killed replica comes back under its name; every replica serves every adapter the
    # same way (the adapters' files come from object storage).
    restarted = cluster.start(owner, "all" if owner == "r-all" else "train")
    live = [b, survivor, restarted]
    prompt = vader_rows()[6]["prompt"]
    for adapter in ["long"] + [f"short-{i}" for i in range(5)]:
        texts = {
            s.client.generate(prompt, adapter_id=adapter, greedy=True, max_new_tokens=12).text
            for s in live
        }
        assert len(texts) == 1, (adapter, texts)

    # A delete on one replica is refused by all, at once.
    survivor.client.delete_adapter("short-0")
    for s in live:
        with pytest.raises(ClientError) as e:
            s.client.generate(prompt, adapter_id="short-0", max_new_tokens=2)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert "short-0" not in [x.id for x in s.client.list_adapters()]

    # PostgreSQL stops for a few seconds while a job runs: calls that need it fail with
    # UNAVAILABLE meanwhile; then the replicas recover by themselves and the job finishes.
    during = _train(b, "during-outage", steps=60, every=5)
    while b.client.get_status(during.id).progress.step < 5:
        time.sleep(0.1)
    cluster.pg.stop()
    try:
        time.sleep(1)
        for s in live:
            with TuneserveClient(s.target, retry=None) as once, pytest.raises(ClientError) as e:
                list(once.list_jobs(timeout=10))
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        time.sleep(3)
    finally:
        cluster.pg.start()
    finished = b.client.wait(during.id, poll_s=0.2, timeout=300)
    assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.error
    assert [p.step for p in b.client.loss_curve(during.id)] == list(range(1, 61))
    for s in live:
        assert s.client.get_adapter("during-outage").steps == 60
