"""End to end: the Python client and the CLI against the real server with mutual TLS and bearer
tokens, and with tokens on a plaintext port."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import BIN, ServerThread, make_config, vader_rows, write_tls_files
from tuneserve_client import ClientError, RetryPolicy, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb

pytestmark = pytest.mark.e2e

TOKEN = "client-e2e-token"
TINY = {"training": pb.TrainingConfig(max_steps=3, batch_size=2, learning_rate=0.01)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = write_tls_files(tmp_path_factory.mktemp("pki"))
    paths["tokens"] = paths["ca"].parent / "tokens"
    paths["tokens"].write_text(f"{TOKEN}\n")
    paths["token"] = paths["ca"].parent / "token"
    paths["token"].write_text(f"{TOKEN}\n")
    return paths


@pytest.fixture(scope="module")
def mutual(
    tiny_gpt2: Path, pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """Mutual TLS (client certificates signed by the test CA) and a bearer token."""
    server = ServerThread(
        make_config(
            tiny_gpt2,
            tmp_path_factory.mktemp("data"),
            tls_cert_file=str(pki["server_cert"]),
            tls_key_file=str(pki["server_key"]),
            tls_client_ca_file=str(pki["ca"]),
            auth_tokens_file=str(pki["tokens"]),
        )
    )
    yield server
    server.stop()


def secure_client(server: ServerThread, pki: dict[str, Path], **overrides: object) -> Any:
    options: dict[str, object] = {
        "root_certificates": pki["ca"],
        "certificate_chain": pki["client_cert"],
        "private_key": pki["client_key"],
        "token": TOKEN,
        **overrides,
    }
    return TuneserveClient(server.target, **options)  # type: ignore[arg-type]


def test_client_trains_and_generates_over_mutual_tls_with_a_token(
    mutual: ServerThread, pki: dict[str, Path]
) -> None:
    with secure_client(mutual, pki) as client:
        client.wait_ready(timeout=30)
        job = client.train(rows=vader_rows()[:4], adapter_id="secure", **TINY)
        job = client.wait_for_job(job.id, poll_s=0.05, timeout=120)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        text = client.generate("Question: hi? Answer:", adapter_id="secure", max_new_tokens=4)
        assert text.generated_tokens >= 1
        chunks = list(client.generate_stream("Question: hi?", adapter_id="secure", seed=1))
        assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert [a.id for a in client.list_adapters()] == ["secure"]


@pytest.mark.parametrize(
    ("token", "reason"), [(None, "MISSING_TOKEN"), ("not-the-token", "INVALID_TOKEN")]
)
def test_without_the_right_token_calls_are_unauthenticated(
    mutual: ServerThread, pki: dict[str, Path], token: str | None, reason: str
) -> None:
    with secure_client(mutual, pki, token=token) as client:
        with pytest.raises(ClientError) as e:
            client.list_adapters()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and e.value.reason == reason
        with pytest.raises(ClientError) as e:
            list(client.generate_stream("hi", max_new_tokens=2))
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_without_a_client_certificate_the_handshake_fails(
    mutual: ServerThread, pki: dict[str, Path]
) -> None:
    with (
        TuneserveClient(
            mutual.target, root_certificates=pki["ca"], token=TOKEN, retry=RetryPolicy.off()
        ) as client,
        pytest.raises(ClientError) as e,
    ):
        client.list_adapters()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_token_on_a_plaintext_port_is_sent_as_metadata(
    tiny_gpt2: Path, pki: dict[str, Path], tmp_path: Path, server_factory
) -> None:
    server = server_factory(
        make_config(tiny_gpt2, tmp_path, auth_tokens_file=str(pki["tokens"])), load=False
    )
    with TuneserveClient(server.target, token=TOKEN) as client:
        assert client.list_adapters() == []
    with TuneserveClient(server.target) as client, pytest.raises(ClientError) as e:
        client.list_adapters()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def cli(target: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TUNESERVE_TOKEN"}
    return subprocess.run(
        [str(BIN), "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment, **(env or {})},
    )


def test_cli_client_commands_take_tls_and_token_options(
    mutual: ServerThread, pki: dict[str, Path]
) -> None:
    tls = [
        "--tls-ca-file",
        str(pki["ca"]),
        "--client-cert-file",
        str(pki["client_cert"]),
        "--client-key-file",
        str(pki["client_key"]),
    ]
    listed = cli(mutual.target, "jobs", *tls, "--token-file", str(pki["token"]))
    assert listed.returncode == 0, listed.stderr
    generated = cli(
        mutual.target,
        "generate",
        "hi",
        "--max-new-tokens",
        "2",
        *tls,
        env={"TUNESERVE_TOKEN": TOKEN},
    )
    assert generated.returncode == 0, generated.stderr
    assert "generated tokens" in generated.stderr
    refused = cli(mutual.target, "adapters", *tls)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    half = cli(mutual.target, "jobs", "--client-cert-file", str(pki["client_cert"]))
    assert half.returncode != 0 and "go together" in half.stderr
