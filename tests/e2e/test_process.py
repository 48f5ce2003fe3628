"""The server as a process: `tuneserve serve` started the way a user starts it, stopped with
SIGTERM (drains and exits 0) or killed with SIGKILL (no job is left RUNNING forever)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests.support import BIN, ServerProcess, vader_rows, wait_running
from tuneserve_client import ClientError, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb

pytestmark = pytest.mark.e2e


def test_sigterm_drains_in_flight_calls_exits_0_and_requeues_the_job(
    tiny_gpt2: Path, tmp_path: Path, processes: list[ServerProcess]
) -> None:
    server = ServerProcess(tiny_gpt2, tmp_path)
    processes.append(server)
    client = server.client
    job = client.train(
        rows=vader_rows(),
        adapter_id="long",
        training=pb.TrainingConfig(max_steps=100_000, batch_size=2),
    )
    wait_running(client, job.id)

    stream = TuneserveClient(server.target)
    chunks = stream.generate_stream("hi", greedy=True, max_new_tokens=480)
    first = next(chunks)  # the call is in flight
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)  # drained, not cut off
    stream.close()
    assert rest and rest[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert first.generated_tokens + len(rest) > 1
    assert server.proc.wait(60) == 0
    assert time.monotonic() - sent < 30
    log = "".join(server.lines)
    assert "stopped by shutdown; it will run again" in log and "Traceback" not in log

    again = ServerProcess(tiny_gpt2, tmp_path)
    processes.append(again)
    resumed = wait_running(again.client, job.id)
    assert resumed.state == pb.JOB_STATE_RUNNING
    again.client.cancel(job.id)
    assert again.client.wait(job.id, timeout=30).state == pb.JOB_STATE_CANCELLED
    assert again.stop(signal.SIGTERM) == 0


def test_job_running_when_the_process_dies_is_never_left_running(
    tiny_gpt2: Path, tmp_path: Path, processes: list[ServerProcess]
) -> None:
    server = ServerProcess(tiny_gpt2, tmp_path, "--max-job-attempts", "2")
    processes.append(server)
    job = server.client.train(
        rows=vader_rows(),
        adapter_id="doomed",
        training=pb.TrainingConfig(max_steps=100_000, batch_size=2),
    )
    wait_running(server.client, job.id)
    server.stop(signal.SIGKILL)

    # First restart: the interrupted job runs again (attempt 2).
    second = ServerProcess(tiny_gpt2, tmp_path, "--max-job-attempts", "2")
    processes.append(second)
    assert wait_running(second.client, job.id).state == pb.JOB_STATE_RUNNING
    second.stop(signal.SIGKILL)

    # Second restart: out of attempts, it fails with a clear reason instead of crash-looping.
    third = ServerProcess(tiny_gpt2, tmp_path, "--max-job-attempts", "2")
    processes.append(third)
    failed = third.client.get_status(job.id)
    assert failed.state == pb.JOB_STATE_FAILED
    assert failed.error.code == "INTERRUPTED" and failed.HasField("end_time")
    assert third.stop(signal.SIGTERM) == 0


def test_bad_configuration_exits_with_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN), "serve", "--listen", "nonsense", "--dataset-roots", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TUNESERVE_BASE_MODEL": ""},
    )
    assert result.returncode == 2
    for setting in ("base_model", "listen", "dataset_roots"):
        assert setting in result.stderr


def test_new_calls_after_sigterm_are_refused(
    tiny_gpt2: Path, tmp_path: Path, processes: list[ServerProcess]
) -> None:
    server = ServerProcess(tiny_gpt2, tmp_path)
    processes.append(server)
    target = server.target
    assert server.stop(signal.SIGTERM) == 0
    with TuneserveClient(target, timeout=5) as client, pytest.raises(ClientError) as e:
        client.list_adapters()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
