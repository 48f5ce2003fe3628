"""End to end: scrape a running server's /metrics over HTTP while it trains and generates,
parse it with prometheus-client's parser, and watch the values move."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import make_config, vader_rows
from tuneserve_client import ClientError, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_training_and_generation(
    tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    server = server_factory(make_config(tiny_gpt2, tmp_path))
    port = server.running.metrics_port
    idle = scrape(port)
    assert value(idle, "tuneserve_gpu_count") == 0  # no GPU here, and no error for it
    assert value(idle, "tuneserve_jobs", state="RUNNING") == 0

    with TuneserveClient(server.target) as client:
        job = client.train(
            rows=vader_rows(),
            adapter_id="watched",
            training=pb.TrainingConfig(max_steps=100_000, batch_size=4),
        )
        deadline = time.monotonic() + 60
        while client.get_status(job.id).progress.step < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        during = scrape(port)
        assert value(during, "tuneserve_jobs", state="RUNNING") == 1
        assert value(during, "tuneserve_training_steps_total") >= 3
        assert value(during, "tuneserve_training_tokens_per_second") > 0
        assert value(during, "tuneserve_training_loss") > 0
        time.sleep(0.3)
        later = scrape(port)
        assert value(later, "tuneserve_training_steps_total") > value(
            during, "tuneserve_training_steps_total"
        )
        client.cancel(job.id)
        client.wait(job.id, timeout=30)

        for i in range(3):
            client.generate("Question: hi? Answer:", max_new_tokens=8, seed=i)
        chunks = list(client.generate_stream("hello", max_new_tokens=8, seed=9))
        with pytest.raises(ClientError):
            client.generate("hi", adapter_id="missing")
        with pytest.raises(ClientError) as e:
            client.get_status("missing")
        assert e.value.code == grpc.StatusCode.NOT_FOUND

    service = "tuneserve.v1.TuneserveService"
    unary = {"grpc_type": "unary", "grpc_service": service}
    # A call is counted as handled once its status is sent, so the client can see the
    # status a moment before the counter moves: wait for the last call's count.
    deadline = time.monotonic() + 5
    while True:
        after = scrape(port)
        handled = value(
            after,
            "grpc_server_handled_total",
            grpc_method="GetStatus",
            grpc_code="NOT_FOUND",
            **unary,
        )
        if handled or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert value(after, "grpc_server_started_total", grpc_method="Generate", **unary) == 4
    assert (
        value(after, "grpc_server_handled_total", grpc_method="Generate", grpc_code="OK", **unary)
        == 3
    )
    assert (
        value(
            after,
            "grpc_server_handled_total",
            grpc_method="Generate",
            grpc_code="NOT_FOUND",
            **unary,
        )
        == 1
    )
    assert (
        value(
            after,
            "grpc_server_handled_total",
            grpc_method="GetStatus",
            grpc_code="NOT_FOUND",
            **unary,
        )
        == 1
    )
    stream = {
        "grpc_type": "server_stream",
        "grpc_service": service,
        "grpc_method": "GenerateStream",
    }
    assert value(after, "grpc_server_handled_total", grpc_code="OK", **stream) == 1
    assert value(after, "grpc_server_handling_seconds_count", **stream) == 1

    generated = chunks[-1].generated_tokens
    before_tokens = value(idle, "tuneserve_generation_generated_tokens_total")
    assert value(after, "tuneserve_generation_generated_tokens_total") - before_tokens >= generated
    finished = sum(
        value(after, "tuneserve_generation_requests_total", outcome=o)
        - value(idle, "tuneserve_generation_requests_total", outcome=o)
        for o in ("EOS", "LENGTH", "STOP_SEQUENCE")
    )
    assert finished == 4
    assert (
        value(after, "tuneserve_generation_time_to_first_token_seconds_count")
        - value(idle, "tuneserve_generation_time_to_first_token_seconds_count")
        == 4
    )
    assert value(after, "tuneserve_generation_inter_token_latency_seconds_count") > value(
        idle, "tuneserve_generation_inter_token_latency_seconds_count"
    )
    assert value(after, "tuneserve_jobs", state="CANCELLED") == 1
    assert value(after, "tuneserve_job_duration_seconds_count", state="CANCELLED") == 1
    assert value(after, "tuneserve_generation_batch_size") == 0
    assert value(after, "tuneserve_generation_queue_depth") == 0
