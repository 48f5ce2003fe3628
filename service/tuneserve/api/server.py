"""Building the gRPC server: our service, the standard health service and reflection, over
TLS or plaintext, with bearer tokens or without; and the optional plaintext health-only
server for Kubernetes probes. Building is separate from running, so tests bind port 0 and
use a real channel."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from tuneserve.api.security import BearerTokenInterceptor
from tuneserve.api.servicer import TuneserveServicer
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TuneserveService"].full_name


class Health:
    """The grpc.health.v1 status of the whole server ("") and of our service."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)


async def create_server(
    servicer: TuneserveServicer,
    *,
    address: str,
    max_message_bytes: int,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    auth: BearerTokenInterceptor | None = None,
) -> tuple[grpc.aio.Server, int, Health]:
    """A server bound to `address` (port 0 picks one), not yet started; health NOT_SERVING.
    `credentials`: TLS (see api.security.server_credentials), else plaintext. `auth` runs
    after `interceptors`, so a metrics interceptor among them counts refused calls too."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    chain = [*interceptors, *([auth] if auth is not None else [])]
    server = grpc.aio.server(options=options, interceptors=chain)
    pb_grpc.add_TuneserveServiceServicer_to_server(servicer, server)
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    await health.set(False)
    port = _bind(server, address, credentials)
    return server, port, health


async def create_health_server(health: Health, *, address: str) -> tuple[grpc.aio.Server, int]:
    """A plaintext server bound to `address` that serves only grpc.health.v1, from the same
    HealthServicer as the main server so both report the same status; for kubelet gRPC
    probes, which cannot speak TLS. Not yet started."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    return server, _bind(server, address, None)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port
