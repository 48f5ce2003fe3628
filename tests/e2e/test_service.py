"""End to end: a real server on port 0, the real client, a tiny model built offline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import ServerThread, adapter_files, make_config, vader_rows
from tuneserve_client import ClientError, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb

pytestmark = pytest.mark.e2e

FIT = {
    "lora": pb.LoraConfig(r=16),
    "training": pb.TrainingConfig(epochs=30, learning_rate=0.01, batch_size=4),
}


@pytest.fixture(scope="module")
def served(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One server with one trained adapter, shared by the tests that only read."""
    data = tmp_path_factory.mktemp("data")
    roots = tmp_path_factory.mktemp("datasets")
    server = ServerThread(make_config(tiny_gpt2, data, dataset_roots=(roots,)))
    client = TuneserveClient(server.target)
    job = client.train(rows=vader_rows(), adapter_id="vader", **FIT)
    seen: list[pb.Job] = []
    done = client.wait(job.id, poll_s=0.02, timeout=300, on_progress=seen.append)
    yield {
        "server": server,
        "client": client,
        "job": done,
        "seen": seen,
        "roots": roots,
        "data": data,
    }
    client.close()
    server.stop()


def test_train_reaches_succeeded_with_progress_along_the_way(served: dict) -> None:
    job, seen = served["job"], served["seen"]
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert job.progress.step == job.progress.total_steps == 120
    assert job.progress.fraction_done == pytest.approx(1.0)
    running = [j for j in seen if j.state == pb.JOB_STATE_RUNNING]
    assert any(0 < j.progress.step < j.progress.total_steps for j in running)
    steps = [j.progress.step for j in running]
    assert steps == sorted(steps)
    mid = next(j for j in running if j.progress.step > 0)
    assert mid.progress.tokens_per_second > 0 and mid.progress.loss > 0
    assert mid.HasField("start_time") and not mid.HasField("end_time")
    assert job.HasField("end_time") and job.adapter_id == "vader"
    assert job.progress.loss < running[0].progress.loss or running[0].progress.step == 0


def test_adapter_is_registered_with_metadata(served: dict) -> None:
    client: TuneserveClient = served["client"]
    adapter = client.get_adapter("vader")
    assert adapter.source_job_id == served["job"].id
    assert adapter.lora.r == 16 and adapter.steps == 120 and adapter.size_bytes > 0
    assert [a.id for a in client.list_adapters()] == ["vader"]
    files = {p.name for p in adapter_files(served["data"], "vader").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tuneserve.json"} <= files


def test_greedy_generation_reproduces_trained_response_and_differs_from_base(served: dict) -> None:
    """Article 2's workflow: LoRA with an end-of-sequence token, base and tuned compared."""
    client: TuneserveClient = served["client"]
    row = vader_rows()[6]  # "Who is your father?"
    tuned = client.generate(row["prompt"], adapter_id="vader", greedy=True, max_new_tokens=30)
    base = client.generate(row["prompt"], greedy=True, max_new_tokens=30)
    assert tuned.text == row["response"]
    assert tuned.finish_reason == pb.FINISH_REASON_EOS  # it learned to stop
    assert base.text != tuned.text
    assert tuned.prompt_tokens > 0 and tuned.generated_tokens > 0


def test_stream_matches_unary_and_ends_with_finish_reason(served: dict) -> None:
    client: TuneserveClient = served["client"]
    prompt = vader_rows()[9]["prompt"]
    unary = client.generate(prompt, adapter_id="vader", greedy=True, max_new_tokens=30)
    chunks = list(
        client.generate_stream(prompt, adapter_id="vader", greedy=True, max_new_tokens=30)
    )
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == pb.FINISH_REASON_EOS
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].generated_tokens == unary.generated_tokens


def test_same_seed_same_text_and_stop_sequences(served: dict) -> None:
    client: TuneserveClient = served["client"]
    sampling = {
        "temperature": 1.3,
        "top_k": 50,
        "top_p": 0.95,
        "max_new_tokens": 20,
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 2,
    }
    a = client.generate("Question: Hello? Answer:", seed=1234, **sampling)
    b = client.generate("Question: Hello? Answer:", seed=1234, **sampling)
    c = client.generate("Question: Hello? Answer:", seed=99, **sampling)
    assert a.text == b.text and a.seed == b.seed == 1234
    assert c.text != a.text
    row = vader_rows()[6]
    stopped = client.generate(row["prompt"], adapter_id="vader", greedy=True, stop=["father"])
    assert stopped.text == " I am your "
    assert stopped.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    short = client.generate(row["prompt"], adapter_id="vader", greedy=True, max_new_tokens=2)
    assert short.finish_reason == pb.FINISH_REASON_LENGTH and short.generated_tokens == 2


def test_unknown_adapter_is_not_found(served: dict) -> None:
    client: TuneserveClient = served["client"]
    with pytest.raises(ClientError) as e:
        client.generate("hi", adapter_id="no-such-adapter")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ClientError) as e:
        client.get_adapter("no-such-adapter")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ClientError) as e:
        client.generate("hi", adapter_id="../etc")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ClientError) as e:
        client.get_status("no-such-job")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_malformed_row_is_invalid_argument_naming_the_row(served: dict) -> None:
    client: TuneserveClient = served["client"]
    rows = [*vader_rows()[:3], {"prompt": "Question: hi? Answer:"}]
    before = len(list(client.list_jobs()))
    with pytest.raises(ClientError) as e:
        client.train(rows=rows, adapter_id="broken")
    err = e.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.row == 3 and err.field == "dataset.inline.rows[3].response"
    assert "rows[3].response" in err.message
    assert len(list(client.list_jobs())) == before  # nothing was queued


def test_bad_settings_are_reported_together(served: dict) -> None:
    client: TuneserveClient = served["client"]
    with pytest.raises(ClientError) as e:
        client.train(
            rows=vader_rows()[:2],
            adapter_id="Bad/Id",
            training=pb.TrainingConfig(learning_rate=5.0),
            lora=pb.LoraConfig(dropout=1.5),
        )
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = {f for f, _ in e.value.violations}
    assert {"adapter_id", "training.learning_rate", "lora.dropout"} <= fields
    with pytest.raises(ClientError) as e:
        client.generate("hi", top_p=1.5, max_new_tokens=100000)
    assert {f for f, _ in e.value.violations} == {"parameters.top_p", "parameters.max_new_tokens"}


def test_dataset_files_only_under_allowed_roots(served: dict, tmp_path: Path) -> None:
    client: TuneserveClient = served["client"]
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"text": "Question: a? Answer: b"}\n')
    with pytest.raises(ClientError) as e:
        client.train(dataset_path=str(outside), adapter_id="outside")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the allowed dataset roots" in e.value.message
    escape = served["roots"] / "escape.jsonl"
    escape.symlink_to(outside)
    with pytest.raises(ClientError) as e:
        client.train(dataset_path=str(escape), adapter_id="escape")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    bad = served["roots"] / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ClientError) as e:
        client.train(dataset_path=str(bad), adapter_id="bad")
    assert e.value.row == 1 and e.value.field == "dataset.path[1].text"
    good = served["roots"] / "good.jsonl"
    good.write_text('{"text": "Question: a? Answer: b"}\n')
    job = client.train(
        dataset_path=str(good), adapter_id="from-file", training=pb.TrainingConfig(max_steps=2)
    )
    assert client.wait(job.id, timeout=120).state == pb.JOB_STATE_SUCCEEDED


def test_duplicate_adapter_id_and_idempotent_request_id(served: dict) -> None:
    client: TuneserveClient = served["client"]
    with pytest.raises(ClientError) as e:
        client.train(rows=vader_rows()[:2], adapter_id="vader")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    first = client.train(
        rows=vader_rows()[:2],
        adapter_id="idem",
        request_id="req-1",
        training=pb.TrainingConfig(max_steps=2),
    )
    again = client.train(
        rows=vader_rows()[:2],
        adapter_id="idem",
        request_id="req-1",
        training=pb.TrainingConfig(max_steps=2),
    )
    assert again.id == first.id
    # The same request_id with another body is not a retry: refused, not answered with the
    # first job as if it were this one.
    with pytest.raises(ClientError) as e:
        client.train(rows=vader_rows()[:2], adapter_id="idem", request_id="req-1")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "request_id" in e.value.message
    assert client.wait(first.id, timeout=120).state == pb.JOB_STATE_SUCCEEDED
    client.delete_adapter("idem")
    with pytest.raises(ClientError) as e:
        client.generate("hi", adapter_id="idem")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(served: dict) -> None:
    channel = grpc.insecure_channel(served["server"].target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tuneserve.v1.TuneserveService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"tuneserve.v1.TuneserveService", "grpc.health.v1.Health"} <= names
    channel.close()


def test_cancelled_job_ends_cancelled(tiny_gpt2: Path, tmp_path: Path, server_factory) -> None:
    server = server_factory(make_config(tiny_gpt2, tmp_path))
    with TuneserveClient(server.target) as client:
        long = client.train(
            rows=vader_rows(),
            adapter_id="long",
            training=pb.TrainingConfig(max_steps=100_000, batch_size=2),
        )
        queued = client.train(rows=vader_rows(), adapter_id="queued")
        assert client.get_status(queued.id).progress.queue_position == 0
        deadline = time.monotonic() + 60
        while client.get_status(long.id).progress.step < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.cancel(queued.id).state == pb.JOB_STATE_CANCELLED
        client.cancel(long.id)
        job = client.wait(long.id, poll_s=0.05, timeout=30)
        assert job.state == pb.JOB_STATE_CANCELLED
        assert job.progress.step < 100_000
        with pytest.raises(ClientError) as e:
            client.cancel(long.id)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert client.list_adapters() == []
        states = {j.id: j.state for j in client.list_jobs(state=pb.JOB_STATE_CANCELLED)}
        assert states == {long.id: pb.JOB_STATE_CANCELLED, queued.id: pb.JOB_STATE_CANCELLED}


def test_restarted_server_keeps_jobs_and_serves_adapter(
    tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    first = server_factory(make_config(tiny_gpt2, tmp_path))
    row = vader_rows()[6]
    with TuneserveClient(first.target) as client:
        job = client.wait(client.train(rows=vader_rows(), adapter_id="kept", **FIT).id, timeout=300)
        assert job.state == pb.JOB_STATE_SUCCEEDED
        before = client.generate(row["prompt"], adapter_id="kept", greedy=True).text
    first.stop()

    second = server_factory(make_config(tiny_gpt2, tmp_path))
    with TuneserveClient(second.target) as client:
        jobs = list(client.list_jobs())
        assert [(j.id, j.state) for j in jobs] == [(job.id, pb.JOB_STATE_SUCCEEDED)]
        assert client.get_status(job.id).progress.step == job.progress.step
        after = client.generate(row["prompt"], adapter_id="kept", greedy=True).text
        assert after == before == row["response"]


def test_not_serving_until_model_loaded(tiny_gpt2: Path, tmp_path: Path, server_factory) -> None:
    server = server_factory(make_config(tiny_gpt2, tmp_path), load=False)
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with TuneserveClient(server.target) as client:
        with pytest.raises(ClientError) as e:
            client.generate("hi")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        server.load()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        assert client.generate("hi", max_new_tokens=3).generated_tokens <= 3
    channel.close()


def test_llama_architecture_trains_and_generates(
    tiny_llama: Path, tmp_path: Path, server_factory
) -> None:
    server = server_factory(make_config(tiny_llama, tmp_path))
    rows = vader_rows()[:4]
    with TuneserveClient(server.target) as client:
        job = client.wait(client.train(rows=rows, adapter_id="llama", **FIT).id, timeout=300)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        modules = set(client.get_adapter("llama").lora.target_modules)
        assert any(m.endswith("q_proj") for m in modules)  # Llama names, not GPT-2's c_attn
        out = client.generate(rows[1]["prompt"], adapter_id="llama", greedy=True)
        assert out.text == rows[1]["response"]


def test_cancelled_stream_frees_the_engine_and_other_calls_stay_answered(served: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

    client: TuneserveClient = served["client"]
    channel = grpc.insecure_channel(served["server"].target)
    stub = pb_grpc.TuneserveServiceStub(channel)
    long = pb.GenerateStreamRequest(
        prompt="hi", parameters=pb.GenerationParameters(greedy=True, max_new_tokens=480)
    )
    call = stub.GenerateStream(long)
    next(call)
    call.cancel()  # the server stops decoding at its next token
    started = time.monotonic()
    assert client.generate("hi", max_new_tokens=2, seed=1).generated_tokens <= 2
    assert time.monotonic() - started < 5

    # Many generations waiting their turn do not starve the job and registry calls.
    with ThreadPoolExecutor(12) as pool:
        streams = [
            pool.submit(lambda: list(stub.GenerateStream(long, timeout=120))) for _ in range(12)
        ]
        time.sleep(0.5)
        started = time.monotonic()
        assert [a.id for a in client.list_adapters()][-1] == "vader"
        client.get_status(served["job"].id)
        assert time.monotonic() - started < 1
        for s in streams:
            assert s.result()[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    channel.close()
