"""Who may talk to the gRPC port: TLS (and mutual TLS) credentials built from the
configuration, and bearer tokens checked by a server interceptor.

Tokens: every call must send metadata `authorization: Bearer <token>`, except
grpc.health.v1, which kubelet probes call without credentials. Server reflection needs a token
like any other call: it lists the whole API (grpcurl: `-H 'authorization: Bearer …'`, or
`-proto` files without reflection). A refused call ends UNAUTHENTICATED with an ErrorInfo
whose reason is MISSING_TOKEN or INVALID_TOKEN, from the one error table (api.errors).
The tokens file and the TLS files are re-read when they change, so a rotated Kubernetes
Secret or a renewed certificate takes effect without a restart (TLS: for new connections);
tokens are compared in constant time and never logged."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from tuneserve import errors
from tuneserve.api.errors import to_status
from tuneserve.config import ServerConfig, read_auth_tokens

log = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the main port, or None for plaintext. With a client CA, clients
    must present a certificate signed by it (the handshake fails otherwise). The files are
    re-read when they change (see CertificateFiles), so a renewed certificate is used for
    new connections without a restart."""
    if not config.tls_cert_file:
        return None
    files = CertificateFiles(
        config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file or None
    )
    return grpc.dynamic_ssl_server_credentials(
        files.load(),
        files.fetch,
        require_client_authentication=config.tls_client_ca_file != "",
    )


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or, as in a Kubernetes Secret volume, swapped
    behind a symlink."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class CertificateFiles:
    """The server certificate chain, its key and the client CA, re-read when one of them
    changes (looked at no more often than every `reload_interval_s`). A new set is used only
    once the key matches the certificate, so a half-written renewal keeps the old one (with
    a warning) instead of failing every handshake.

    `fetch` is gRPC's certificate_configuration_fetcher: called from gRPC's own threads
    before each new connection's handshake; the lock makes it safe to call concurrently."""

    reload_interval_s: float = 5.0

    def __init__(self, cert: str | Path, key: str | Path, client_ca: str | Path | None) -> None:
        self.paths = tuple(Path(p) for p in (cert, key, client_ca) if p)
        self._lock = threading.Lock()
        self._signatures = [_signature(p) for p in self.paths]
        self._checked_at = time.monotonic()

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The certificate configuration from the files as they are now; raises OSError or
        ssl.SSLError when they cannot be read or the key does not match the certificate."""
        cert, key, *ca = self.paths
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key, password=b"")
        if ca:
            context.load_verify_locations(cafile=ca[0])
        return grpc.ssl_server_certificate_configuration(
            [(key.read_bytes(), cert.read_bytes())],
            root_certificates=ca[0].read_bytes() if ca else None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed and load, else None (keep the current
        one). Never raises: this runs inside gRPC's handshake path."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < self.reload_interval_s:
                return None
            self._checked_at = now
            signatures = [_signature(p) for p in self.paths]
            if signatures == self._signatures:
                return None
            self._signatures = signatures
            try:
                configuration = self.load()
            except (OSError, ssl.SSLError, ValueError) as e:
                log.warning("TLS files changed but cannot be used (%s); keeping the old ones", e)
                return None
            log.info("TLS files re-read: %s", ", ".join(str(p) for p in self.paths))
            return configuration


class TokenFile:
    """The accepted tokens, re-read from `path` when its modification time (or size, or
    inode: a Secret's files are swapped by symlink) changes, looked at no more often than
    every `reload_interval_s`. A file that cannot be read or holds no token keeps the last
    good set and logs a warning; the first read must succeed (config validation saw to it).

    Not thread-safe: used from the server's event loop only."""

    reload_interval_s: float = 5.0

    def __init__(self, path: str | Path, *, reload_interval_s: float | None = None) -> None:
        self.path = Path(path)
        if reload_interval_s is not None:
            self.reload_interval_s = reload_interval_s
        self._signature = _signature(self.path)
        self._tokens = [t.encode() for t in read_auth_tokens(self.path)]
        self._checked_at = time.monotonic()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.reload_interval_s:
            return
        self._checked_at = now
        signature = _signature(self.path)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            tokens = read_auth_tokens(self.path)
        except (OSError, ValueError) as e:
            log.warning(
                "auth tokens file %s unusable (%s); keeping the %d tokens read before",
                self.path,
                e,
                len(self._tokens),
            )
            return
        self._tokens = [t.encode() for t in tokens]
        log.info("auth tokens file %s re-read: %d tokens", self.path, len(self._tokens))

    def accepts(self, token: str) -> bool:
        """Whether `token` is one of the tokens, in time that does not depend on how much of
        it matches any of them."""
        self._refresh()
        given = token.encode()
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(known, given)
        return matched


def check_bearer(metadata: Any, tokens: TokenFile) -> None:
    """Raise errors.Unauthenticated unless `metadata` carries an accepted bearer token."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if not values:
        raise errors.Unauthenticated(
            "missing metadata 'authorization: Bearer <token>'", reason="MISSING_TOKEN"
        )
    value = values[0]
    if isinstance(value, bytes):  # only -bin keys are bytes; be safe anyway
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not tokens.accepts(token.strip()):
        raise errors.Unauthenticated("invalid bearer token", reason="INVALID_TOKEN")


def caller_of(metadata: Any) -> str:
    """Who is calling, for per-caller limits: a fingerprint of the bearer token (never the
    token itself, which would then sit in the job store), or "" without one. Only accepted
    tokens reach a handler when tokens are required."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if not values:
        return ""
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    token = value.strip().partition(" ")[2].strip()
    if not token:
        return ""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted bearer token, before the handler runs. Put it after
    the metrics interceptor so refused calls are still counted (as UNAUTHENTICATED)."""

    def __init__(self, tokens: TokenFile, *, exempt: tuple[str, ...] = EXEMPT_PREFIXES):
        self.tokens = tokens
        self._exempt = exempt

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._exempt):
            return handler
        try:
            check_bearer(details.invocation_metadata, self.tokens)
        except errors.Unauthenticated as e:
            # DEBUG, not INFO: anyone can send these; grpc_server_handled_total counts them.
            log.debug("refused %s: %s", details.method, e.reason)
            return _refusal(handler, to_status(e))
        return handler


def _refusal(handler: grpc.RpcMethodHandler, status: grpc.Status) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with `status`."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort_with_status(status)

    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    # The request is left as bytes: nothing from an unauthenticated caller gets parsed.
    kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)
