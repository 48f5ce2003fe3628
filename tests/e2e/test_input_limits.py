"""Input that is too big or wrong in shape, against a real server: refused with a clear
status before any work on it, and never at anyone else's expense (issue 18)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests.support import BIN, make_config, vader_rows
from tuneserve_client import ClientError, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

NINE_MB = "the dark side " * (9 * 1024 * 1024 // 14)


@pytest.fixture(scope="module")
def server(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.support import ServerThread

    running = ServerThread(
        make_config(tiny_gpt2, tmp_path_factory.mktemp("limits"), max_queued_jobs=3)
    )
    yield running
    running.stop()


def test_a_9mb_prompt_is_refused_at_once_on_both_generate_rpcs(server) -> None:  # type: ignore[no-untyped-def]
    with TuneserveClient(server.target) as client:
        started = time.monotonic()
        with pytest.raises(ClientError) as e:
            client.generate(NINE_MB, max_new_tokens=4)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # Refused from its size alone, unparsed: parsing 9 MB held the event loop.
        assert "bytes, over the" in e.value.message
        with pytest.raises(ClientError) as e:
            list(client.generate_stream(NINE_MB, max_new_tokens=4))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # A prompt small enough to parse, still past the characters the limit allows.
        with pytest.raises(ClientError) as e:
            client.generate("x" * (4096 * 32 + 1), max_new_tokens=4)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.violations[0][0] == "prompt"
        # Before: tokenised whole (10-14 s) before the token limit refused it.
        assert time.monotonic() - started < 3.0


def test_classify_text_longer_than_the_models_positions_is_invalid(server) -> None:  # type: ignore[no-untyped-def]
    """GPT-2's position table ends at n_positions; Generate checked it, Classify indexed
    past it (IndexError, INTERNAL)."""
    rows = [{"text": f"a fine film {i}", "label": "pos" if i % 2 else "neg"} for i in range(8)]
    with TuneserveClient(server.target) as client:
        job = client.train(
            rows=rows,
            adapter_id="limits-classifier",
            task=pb.TASK_TYPE_SEQUENCE_CLASSIFICATION,
            training=pb.TrainingConfig(max_steps=1),
        )
        assert client.wait(job.id, timeout=300).state == pb.JOB_STATE_SUCCEEDED
        long_text = "word " * 5000  # within the prompt limit's characters, past the positions
        with pytest.raises(ClientError) as e:
            client.classify("limits-classifier", ["short", long_text])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.violations[0][0] == "texts[1]"
        assert client.classify("limits-classifier", ["short"])[0].label in ("pos", "neg")


def test_a_20kb_job_id_gets_a_short_not_found(server) -> None:  # type: ignore[no-untyped-def]
    with TuneserveClient(server.target) as client:
        with pytest.raises(ClientError) as e:
            client.get_status("j" * 20_000)
        assert e.value.code == grpc.StatusCode.NOT_FOUND  # not RESOURCE_EXHAUSTED
        assert len(e.value.message) < 200


@pytest.mark.parametrize("token", ["¹²³", str(2**64)])
def test_foreign_page_tokens_are_invalid_arguments(server, token: str) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TuneserveServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ListJobs(pb.ListJobsRequest(page_token=token), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_unknown_task_is_invalid_not_trained_as_causal_lm(server) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TuneserveServiceStub(channel)
        request = pb.TrainJobRequest(
            dataset=pb.Dataset(inline=pb.InlineDataset(rows=[pb.DatasetRow(text="hello there")])),
            task=99,  # type: ignore[arg-type]
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.TrainJob(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "task" in (e.value.details() or "")


def test_the_job_queue_is_bounded_with_a_retry_hint(server) -> None:  # type: ignore[no-untyped-def]
    with TuneserveClient(server.target) as client:
        accepted, refused = [], None
        for i in range(6):
            try:
                accepted.append(
                    client.train(
                        rows=vader_rows()[:2],
                        adapter_id=f"burst-{i}",
                        training=pb.TrainingConfig(max_steps=1),
                        timeout=30,
                    )
                )
            except ClientError as e:
                refused = e
                break
        assert refused is not None and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(accepted) <= 3
        for job in accepted:
            client.wait(job.id, timeout=300)


def test_cli_output_into_a_closed_pipe_ends_quietly(server) -> None:  # type: ignore[no-untyped-def]
    with TuneserveClient(server.target) as client:
        for i in range(3):
            job = client.train(
                rows=vader_rows()[:2],
                adapter_id=f"pipe-{i}",
                training=pb.TrainingConfig(max_steps=1),
            )
            client.cancel(job.id)
    done = subprocess.run(
        f"'{BIN}' --target {server.target} jobs | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
