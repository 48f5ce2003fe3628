"""Channels: plaintext or TLS (optionally mutual), with an optional bearer token."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc

# A PEM given as bytes is the PEM itself; a str or a path names a file holding it.
PemSource = bytes | str | os.PathLike[str]

MESSAGE_LIMITS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def read_pem(source: PemSource) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def open_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: PemSource | None = None,
    certificate_chain: PemSource | None = None,
    private_key: PemSource | None = None,
    server_name_override: str | None = None,
    token: str | None = None,
) -> tuple[grpc.Channel, tuple[tuple[str, str], ...]]:
    """Return the channel and the metadata to send with every call on it.

    TLS is used when `tls` is true or any certificate is given; with no
    `root_certificates` the system's trust store is used. On TLS the token travels as call
    credentials; on a plaintext channel grpc refuses call credentials, so it is returned as
    metadata for the client to attach to each call (only sensible on a trusted network)."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("mutual TLS needs both certificate_chain and private_key")
    if token is not None:
        token = token.strip()
        if not token or any(c in token for c in "\r\n"):
            raise ValueError("the token must be one non-empty line")
    secure = tls or root_certificates is not None or certificate_chain is not None
    if not secure:
        if server_name_override:
            raise ValueError("server_name_override needs TLS")
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return grpc.insecure_channel(target, options=MESSAGE_LIMITS), metadata
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(root_certificates) if root_certificates is not None else None,
        private_key=read_pem(private_key) if private_key is not None else None,
        certificate_chain=read_pem(certificate_chain) if certificate_chain is not None else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    options = list(MESSAGE_LIMITS)
    if server_name_override:
        options.append(("grpc.ssl_target_name_override", server_name_override))
    return grpc.secure_channel(target, credentials, options=options), ()
