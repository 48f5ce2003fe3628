"""End to end: batched multi-adapter generation, its limits, adapter loading and importing,
and generation answered while a fine-tune runs."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tests.support import adapter_files, make_config, vader_rows
from tuneserve_client import ClientError, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

QUICK = {
    "lora": pb.LoraConfig(r=8),
    "training": pb.TrainingConfig(epochs=15, learning_rate=0.01, batch_size=4),
}


def _train(client: TuneserveClient, adapter_id: str, rows: list[dict[str, str]]) -> None:
    job = client.wait(client.train(rows=rows, adapter_id=adapter_id, **QUICK).id, timeout=300)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error


def test_mixed_adapter_batches_match_each_adapter_alone(
    tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    server = server_factory(make_config(tiny_gpt2, tmp_path, max_loaded_adapters=4))
    rows = vader_rows()
    with TuneserveClient(server.target) as client:
        for i, adapter in enumerate(("one", "two", "three")):
            _train(client, adapter, rows[4 * i : 4 * i + 4])
        prompts = [r["prompt"] for r in rows[:8]]
        calls = [(adapter, prompt) for adapter in ("", "one", "two", "three") for prompt in prompts]
        alone = {
            call: client.generate(call[1], adapter_id=call[0], greedy=True, max_new_tokens=24).text
            for call in calls
        }
        engine = server.running.services.engine
        engine.stats.peak_running = 0

        def together(call: tuple[str, str]) -> str:
            with TuneserveClient(server.target) as c:
                chunks = c.generate_stream(
                    call[1], adapter_id=call[0], greedy=True, max_new_tokens=24
                )
                return "".join(chunk.text for chunk in chunks)

        with ThreadPoolExecutor(len(calls)) as pool:
            batched = dict(zip(calls, pool.map(together, calls), strict=True))
        assert batched == alone
        assert engine.stats.peak_running >= 8  # they really shared forward passes
        # Each adapter's outputs differ from the base's: the rows used their own adapter.
        assert any(alone[("one", p)] != alone[("", p)] for p in prompts)
        assert alone[("one", rows[1]["prompt"])] == rows[1]["response"]
        assert alone[("two", rows[5]["prompt"])] == rows[5]["response"]


def test_cancel_frees_a_slot_and_overload_is_resource_exhausted(
    tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    server = server_factory(
        make_config(tiny_gpt2, tmp_path, max_batch_size=1, max_queued_requests=1)
    )
    stub = pb_grpc.TuneserveServiceStub(grpc.insecure_channel(server.target))
    long = pb.GenerateStreamRequest(
        prompt="hi", parameters=pb.GenerationParameters(greedy=True, max_new_tokens=480)
    )
    engine = server.running.services.engine
    # retry=None: this test is about the server's answer, not the client's retries.
    with TuneserveClient(server.target, retry=None) as client:
        running = stub.GenerateStream(long)
        next(running)  # it holds the only batch slot
        waiting = stub.GenerateStream(long)  # it holds the only queue place
        deadline = time.monotonic() + 10
        while engine.stats.waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(ClientError) as e:
            client.generate("hi", max_new_tokens=2)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.retry_after_s == pytest.approx(1.0)

        running.cancel()  # its slot goes to the waiting one at the next step
        first = next(waiting)
        assert first.generated_tokens >= 1
        waiting.cancel()
        started = time.monotonic()
        assert client.generate("hi", max_new_tokens=3, seed=1).generated_tokens <= 3
        assert time.monotonic() - started < 5  # not behind 2 x 480 tokens
        deadline = time.monotonic() + 5  # stats settle right after the last step
        while engine.stats.running or engine.stats.waiting:
            assert time.monotonic() < deadline, engine.stats
            time.sleep(0.01)


def test_limits_are_invalid_argument(tiny_gpt2: Path, tmp_path: Path, server_factory) -> None:
    server = server_factory(
        make_config(
            tiny_gpt2, tmp_path, max_prompt_tokens=8, max_new_tokens=16, default_max_new_tokens=8
        )
    )
    with TuneserveClient(server.target) as client:
        with pytest.raises(ClientError) as e:
            client.generate("a prompt that is clearly longer than eight tokens, by far")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == "prompt"
        with pytest.raises(ClientError) as e:
            client.generate("hi", max_new_tokens=17)
        assert e.value.field == "parameters.max_new_tokens"


def test_load_pin_unload_and_import_adapters(
    tiny_gpt2: Path, tiny_llama: Path, tmp_path: Path, server_factory
) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    config = make_config(
        tiny_gpt2, tmp_path / "data", max_loaded_adapters=1, adapter_import_roots=(imports,)
    )
    server = server_factory(config)
    rows = vader_rows()
    with TuneserveClient(server.target) as client:
        _train(client, "first", rows[:4])
        _train(client, "second", rows[4:8])
        assert client.load_adapter("first", pin=True).pinned
        with pytest.raises(ClientError) as e:  # the one slot is pinned
            client.generate(rows[5]["prompt"], adapter_id="second")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            client.generate(rows[1]["prompt"], adapter_id="first", greedy=True).text
            == (rows[1]["response"])
        )
        assert not client.unload_adapter("first").loaded
        second = client.generate(rows[5]["prompt"], adapter_id="second", greedy=True).text
        assert second == rows[5]["response"]
        states = {a.id: (a.loaded, a.pinned) for a in client.list_adapters()}
        assert states == {"first": (False, False), "second": (True, False)}
        with pytest.raises(ClientError) as e:
            client.unload_adapter("first")
        assert e.value.code == grpc.StatusCode.NOT_FOUND

        # Import a PEFT directory made elsewhere (here: a copy of "second").
        shutil.copytree(adapter_files(tmp_path / "data", "second"), imports / "peft-dir")
        imported = client.import_adapter(str(imports / "peft-dir"), "imported")
        assert imported.lora.r == 8 and imported.source_job_id == ""
        out = client.generate(rows[5]["prompt"], adapter_id="imported", greedy=True).text
        assert out == second

        with pytest.raises(ClientError) as e:
            client.import_adapter(str(adapter_files(tmp_path / "data", "second")), "outside")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the allowed adapter roots" in e.value.message

    # An adapter for another base model does not fit: refused, nothing registered.
    llama_server = server_factory(make_config(tiny_llama, tmp_path / "llama-data"))
    with TuneserveClient(llama_server.target) as client:
        _train(client, "llama", rows[:2])
    shutil.copytree(adapter_files(tmp_path / "llama-data", "llama"), imports / "llama-dir")
    with TuneserveClient(server.target) as client:
        with pytest.raises(ClientError) as e:
            client.import_adapter(str(imports / "llama-dir"), "misfit")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not have" in e.value.message or "does not fit" in e.value.message
        assert "misfit" not in {a.id for a in client.list_adapters()}


def test_generation_is_answered_while_a_job_trains(
    tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    server = server_factory(make_config(tiny_gpt2, tmp_path))
    with TuneserveClient(server.target) as client:
        job = client.train(
            rows=vader_rows(),
            adapter_id="busy",
            training=pb.TrainingConfig(max_steps=100_000, batch_size=4),
        )
        deadline = time.monotonic() + 60
        while client.get_status(job.id).progress.step < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = client.get_status(job.id).progress.step
        latencies = []
        for i in range(5):
            started = time.monotonic()
            out = client.generate("Question: hi? Answer:", max_new_tokens=16, seed=i)
            latencies.append(time.monotonic() - started)
            assert out.generated_tokens >= 1
        assert max(latencies) < 5  # nobody waits for the job to finish
        time.sleep(0.5)
        during = client.get_status(job.id)
        assert during.state == pb.JOB_STATE_RUNNING
        assert during.progress.step > before  # and the job kept training meanwhile
        client.cancel(job.id)
        assert client.wait(job.id, timeout=30).state == pb.JOB_STATE_CANCELLED
