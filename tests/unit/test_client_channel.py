"""The Python client's TLS, mutual TLS and bearer token against a real gRPC server on port 0
with certificates minted by trustme (the server's own TLS is tested end to end elsewhere)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tuneserve_client import ClientError, RetryPolicy, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

trustme = pytest.importorskip("trustme")


class EchoToken(pb_grpc.TuneserveServiceServicer):
    """GetStatus answers with the caller's authorization header as the job id."""

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> pb.GetStatusResponse:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        return pb.GetStatusResponse(job=pb.Job(id=str(auth)))


@pytest.fixture(scope="module")
def ca() -> Any:
    return trustme.CA()


@pytest.fixture(scope="module")
def mtls_target(ca: Any) -> Iterator[str]:
    """A server that wants a client certificate signed by `ca`; its own certificate names
    127.0.0.1 and tuneserve.internal."""
    cert = ca.issue_cert("127.0.0.1", "tuneserve.internal")
    credentials = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())],
        root_certificates=ca.cert_pem.bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TuneserveServiceServicer_to_server(EchoToken(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture(scope="module")
def client_files(ca: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pki")
    cert = ca.issue_cert("client.example")
    ca.cert_pem.write_to_path(out / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(out / "client.pem")
    cert.private_key_pem.write_to_path(out / "client.key")
    return {"ca": out / "ca.pem", "cert": out / "client.pem", "key": out / "client.key"}


def test_mutual_tls_with_a_token_from_files(mtls_target: str, client_files: dict) -> None:
    with TuneserveClient(
        mtls_target,
        root_certificates=str(client_files["ca"]),
        certificate_chain=client_files["cert"],
        private_key=client_files["key"],
        token="t0ken",
    ) as client:
        assert client.get_status("j").id == "Bearer t0ken"


def test_pem_bytes_and_a_server_name_override(mtls_target: str, client_files: dict) -> None:
    port = mtls_target.rsplit(":", 1)[1]
    with TuneserveClient(
        f"localhost:{port}",  # not a name in the certificate: the override is what is checked
        root_certificates=client_files["ca"].read_bytes(),
        certificate_chain=client_files["cert"].read_bytes(),
        private_key=client_files["key"].read_bytes(),
        server_name_override="tuneserve.internal",
    ) as client:
        assert client.get_status("j").id == ""  # no token, no header


@pytest.mark.parametrize("case", ["no client certificate", "another CA"])
def test_handshake_failures_are_unavailable(
    mtls_target: str, client_files: dict, case: str
) -> None:
    if case == "no client certificate":
        options: dict[str, Any] = {"root_certificates": client_files["ca"]}
    else:
        other = trustme.CA()
        cert = other.issue_cert("client.example")
        options = {
            "root_certificates": other.cert_pem.bytes(),
            "certificate_chain": cert.cert_chain_pems[0].bytes(),
            "private_key": cert.private_key_pem.bytes(),
        }
    with (
        TuneserveClient(mtls_target, retry=RetryPolicy.off(), timeout=10, **options) as client,
        pytest.raises(ClientError) as e,
    ):
        client.get_status("j")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_inconsistent_options_are_refused_at_once(client_files: dict) -> None:
    with pytest.raises(ValueError, match="both"):
        TuneserveClient("127.0.0.1:1", certificate_chain=client_files["cert"])
    with pytest.raises(ValueError, match="TLS"):
        TuneserveClient("127.0.0.1:1", server_name_override="tuneserve.internal")
    with pytest.raises(ValueError, match="one non-empty line"):
        TuneserveClient("127.0.0.1:1", token="a\nb")
