"""End to end: the real server on port 0 with TLS, mutual TLS and bearer tokens, talked to over
real TLS channels with the generated stubs; the plaintext health-only port beside it."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ServerThread, make_config, write_tls_files
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

TOKEN = "s3cr3t-token-for-tests"
BEARER = (("authorization", f"Bearer {TOKEN}"),)
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secured(
    tiny_gpt2: Path, tls: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """TLS (server certificate only) with bearer tokens and a plaintext health port."""
    tokens = tmp_path_factory.mktemp("secrets") / "tokens"
    tokens.write_text(f"# service tokens\n\n{TOKEN}\n  other-token  \n")
    server = ServerThread(
        make_config(
            tiny_gpt2,
            tmp_path_factory.mktemp("data"),
            tls_cert_file=str(tls["server_cert"]),
            tls_key_file=str(tls["server_key"]),
            auth_tokens_file=str(tokens),
            health_listen="127.0.0.1:0",
        )
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mutual(
    tiny_gpt2: Path, tls: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """Mutual TLS: client certificates signed by the test CA required; no tokens."""
    server = ServerThread(
        make_config(
            tiny_gpt2,
            tmp_path_factory.mktemp("data"),
            tls_cert_file=str(tls["server_cert"]),
            tls_key_file=str(tls["server_key"]),
            tls_client_ca_file=str(tls["ca"]),
        )
    )
    yield server
    server.stop()


def tls_channel(target: str, tls: dict[str, Path], *, client: str | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls["ca"].read_bytes(),
        private_key=tls[f"{client}_key"].read_bytes() if client else None,
        certificate_chain=tls[f"{client}_cert"].read_bytes() if client else None,
    )
    return grpc.secure_channel(target, creds)


def list_adapters(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> object:
    stub = pb_grpc.TuneserveServiceStub(channel)
    return stub.ListAdapters(pb.ListAdaptersRequest(), metadata=metadata, timeout=10)


def check_health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def refusal(call: object) -> tuple[grpc.StatusCode, str]:
    """The status code and ErrorInfo reason of a call that must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    error = caught.value
    reason = ""
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    assert info.domain == "tuneserve"
                    reason = info.reason
    return error.code(), reason  # type: ignore[attr-defined]


def test_tls_call_without_token_is_unauthenticated_missing_token(
    secured: ServerThread, tls: dict[str, Path]
) -> None:
    with tls_channel(secured.target, tls) as channel:
        assert refusal(lambda: list_adapters(channel)) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "MISSING_TOKEN",
        )


@pytest.mark.parametrize(
    "header", ["Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "]
)
def test_tls_call_with_wrong_token_is_unauthenticated_invalid_token(
    secured: ServerThread, tls: dict[str, Path], header: str
) -> None:
    with tls_channel(secured.target, tls) as channel:
        call = lambda: list_adapters(channel, (("authorization", header),))  # noqa: E731
        assert refusal(call) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")


def test_tls_call_with_right_token_is_served_any_listed_token(
    secured: ServerThread, tls: dict[str, Path]
) -> None:
    with tls_channel(secured.target, tls) as channel:
        list_adapters(channel, BEARER)
        list_adapters(channel, (("authorization", "bearer other-token"),))
        stream = pb_grpc.TuneserveServiceStub(channel).GenerateStream(
            pb.GenerateStreamRequest(
                # Greedy: a sampled token could be end-of-sequence and end it after one.
                prompt="Hello",
                parameters=pb.GenerationParameters(greedy=True, max_new_tokens=2),
            ),
            metadata=BEARER,
            timeout=30,
        )
        assert list(stream)[-1].generated_tokens == 2


def test_streaming_call_without_token_is_refused(
    secured: ServerThread, tls: dict[str, Path]
) -> None:
    with tls_channel(secured.target, tls) as channel:
        stub = pb_grpc.TuneserveServiceStub(channel)
        call = lambda: list(  # noqa: E731
            stub.GenerateStream(pb.GenerateStreamRequest(prompt="Hello"), timeout=10)
        )
        assert refusal(call) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")


def test_health_on_tls_port_answers_without_token(
    secured: ServerThread, tls: dict[str, Path]
) -> None:
    with tls_channel(secured.target, tls) as channel:
        assert check_health(channel) == SERVING
        assert check_health(channel, "tuneserve.v1.TuneserveService") == SERVING


def test_reflection_needs_a_token(secured: ServerThread, tls: dict[str, Path]) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with tls_channel(secured.target, tls) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = lambda: list(stub.ServerReflectionInfo(iter([request]), timeout=10))  # noqa: E731
        assert refusal(call) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")
        [answer] = stub.ServerReflectionInfo(iter([request]), metadata=BEARER, timeout=10)
        names = {s.name for s in answer.list_services_response.service}
        assert "tuneserve.v1.TuneserveService" in names


def test_plaintext_client_against_tls_port_fails(secured: ServerThread) -> None:
    with grpc.insecure_channel(secured.target) as channel:
        assert refusal(lambda: list_adapters(channel, BEARER))[0] == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            check_health(channel)


def test_client_that_does_not_trust_the_server_ca_fails(
    secured: ServerThread, tls: dict[str, Path]
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=tls["stranger_cert"].read_bytes())
    with grpc.secure_channel(secured.target, creds) as channel:
        assert refusal(lambda: list_adapters(channel, BEARER))[0] == grpc.StatusCode.UNAVAILABLE


def test_plaintext_health_port_serves_only_health(secured: ServerThread) -> None:
    assert secured.running.health_port not in (None, 0, secured.running.port)
    with grpc.insecure_channel(f"127.0.0.1:{secured.running.health_port}") as channel:
        assert check_health(channel) == SERVING
        assert check_health(channel, "tuneserve.v1.TuneserveService") == SERVING
        code, _ = refusal(lambda: list_adapters(channel, BEARER))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        call = lambda: list(reflection.ServerReflectionInfo(iter([request]), timeout=10))  # noqa: E731
        assert refusal(call)[0] == grpc.StatusCode.UNIMPLEMENTED


def test_unauthenticated_calls_are_counted_in_metrics(
    secured: ServerThread, tls: dict[str, Path]
) -> None:
    labels = {
        "grpc_type": "unary",
        "grpc_service": "tuneserve.v1.TuneserveService",
        "grpc_method": "ListAdapters",
        "grpc_code": "UNAUTHENTICATED",
    }

    def refused_count() -> float:
        url = f"http://127.0.0.1:{secured.running.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "grpc_server_handled_total" and s.labels == labels
        )

    before = refused_count()
    with tls_channel(secured.target, tls) as channel:
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                list_adapters(channel)
    # The status reaches the client a moment before the interceptor records it.
    deadline = time.monotonic() + 5
    while refused_count() < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused_count() == before + 3


def test_rotated_token_is_honoured_after_reload_interval(
    secured: ServerThread, tls: dict[str, Path]
) -> None:
    tokens = secured.running.auth.tokens  # type: ignore[union-attr]
    original = tokens.path.read_text()
    tokens.reload_interval_s = 0.2
    rotated = (("authorization", "Bearer rotated-token"),)
    try:
        with tls_channel(secured.target, tls) as channel:
            replacement = tokens.path.with_name("tokens.new")
            replacement.write_text("rotated-token\n")
            replacement.replace(tokens.path)  # as a Secret update swaps the file
            accepted_after(lambda: list_adapters(channel, rotated))
            code, reason = refusal(lambda: list_adapters(channel, BEARER))
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")

            tokens.path.write_text("")  # a broken update keeps the last good tokens
            time.sleep(0.3)
            list_adapters(channel, rotated)
    finally:
        tokens.path.write_text(original)
        with tls_channel(secured.target, tls) as channel:
            accepted_after(lambda: list_adapters(channel, BEARER))
        tokens.reload_interval_s = type(tokens).reload_interval_s


def accepted_after(call: object, timeout: float = 10) -> None:
    """Retry `call` while it is refused UNAUTHENTICATED, until it succeeds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call()  # type: ignore[operator]
            return
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the new token was never accepted"
            time.sleep(0.05)


def test_mtls_accepts_a_client_certificate_from_the_trusted_ca(
    mutual: ServerThread, tls: dict[str, Path]
) -> None:
    with tls_channel(mutual.target, tls, client="client") as channel:
        assert list_adapters(channel) is not None  # no tokens configured: the certificate is enough
        assert check_health(channel) == SERVING


def test_mtls_refuses_a_client_certificate_from_another_ca(
    mutual: ServerThread, tls: dict[str, Path]
) -> None:
    with tls_channel(mutual.target, tls, client="stranger") as channel:
        assert refusal(lambda: list_adapters(channel))[0] == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_certificate(
    mutual: ServerThread, tls: dict[str, Path]
) -> None:
    with tls_channel(mutual.target, tls) as channel:
        assert refusal(lambda: list_adapters(channel))[0] == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            check_health(channel)


def test_health_port_follows_the_main_servers_status(
    tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    """The same HealthServicer behind both ports: NOT_SERVING while the model loads, SERVING
    after; the health port closes with the server."""
    server = server_factory(
        make_config(tiny_gpt2, tmp_path, health_listen="127.0.0.1:0"), load=False
    )
    target = f"127.0.0.1:{server.running.health_port}"
    with grpc.insecure_channel(target) as channel:
        assert check_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        server.load()
        assert check_health(channel) == SERVING
        with grpc.insecure_channel(server.target) as main:  # plaintext main port, same status
            assert check_health(main) == SERVING
    server.stop()
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as caught:
        check_health(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_renewed_server_certificate_is_used_for_new_connections(
    tiny_gpt2: Path, tmp_path: Path, server_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuneserve.api.security import CertificateFiles

    monkeypatch.setattr(CertificateFiles, "reload_interval_s", 0.1)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = write_tls_files(tmp_path / "old"), write_tls_files(tmp_path / "new")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(old["server_cert"].read_bytes())
    key.write_bytes(old["server_key"].read_bytes())
    server = server_factory(
        make_config(tiny_gpt2, tmp_path / "data", tls_cert_file=str(cert), tls_key_file=str(key))
    )
    with tls_channel(server.target, old) as channel:
        assert check_health(channel) == SERVING
    with tls_channel(server.target, new) as channel, pytest.raises(grpc.RpcError):
        check_health(channel)

    for source, live in ((new["server_cert"], cert), (new["server_key"], key)):
        staged = live.with_suffix(".new")
        staged.write_bytes(source.read_bytes())
        staged.replace(live)
    deadline = time.monotonic() + 10
    while True:  # each attempt is a new channel, so a new handshake
        with tls_channel(server.target, new) as channel:
            try:
                assert check_health(channel) == SERVING
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the renewed certificate was never served"
                time.sleep(0.1)
    with tls_channel(server.target, old) as channel, pytest.raises(grpc.RpcError):
        check_health(channel)  # the old CA no longer vouches for the server
