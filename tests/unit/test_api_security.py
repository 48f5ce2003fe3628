"""tuneserve.api.security: the tokens file (parsing, reloading, keeping the last good set),
the bearer check and its status, and the TLS credentials."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.support import make_config, write_tls_files
from tuneserve import errors
from tuneserve.api.errors import to_status
from tuneserve.api.security import CertificateFiles, TokenFile, check_bearer, server_credentials
from tuneserve.config import read_auth_tokens


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_tokens_file_skips_blank_lines_and_comments_and_strips(tmp_path: Path) -> None:
    path = write(tmp_path / "t", "# prod\n\n  alpha  \nbeta\n\t# rotated 2024\nalpha\n")
    assert read_auth_tokens(path) == {"alpha", "beta"}


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  \n"])
def test_tokens_file_without_tokens_is_an_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match="no tokens"):
        read_auth_tokens(write(tmp_path / "t", text))


def test_tokens_file_line_with_spaces_is_an_error_that_does_not_echo_it(tmp_path: Path) -> None:
    path = write(tmp_path / "t", "good\nsecret-part other-part\n")
    with pytest.raises(ValueError, match="line 2") as caught:
        read_auth_tokens(path)
    assert "secret-part" not in str(caught.value)


def test_tokens_file_missing_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        read_auth_tokens(tmp_path / "absent")


def test_token_file_accepts_only_listed_tokens(tmp_path: Path) -> None:
    tokens = TokenFile(write(tmp_path / "t", "alpha\nbeta\n"))
    assert tokens.accepts("alpha") and tokens.accepts("beta")
    assert not tokens.accepts("alph") and not tokens.accepts("alphaa")
    assert not tokens.accepts("") and not tokens.accepts("ALPHA")


def test_token_file_reloads_a_replaced_file_after_the_interval(tmp_path: Path) -> None:
    path = write(tmp_path / "t", "old\n")
    tokens = TokenFile(path, reload_interval_s=0)
    write(tmp_path / "new", "new\n").replace(path)
    assert tokens.accepts("new") and not tokens.accepts("old")


def test_token_file_does_not_look_before_the_interval(tmp_path: Path) -> None:
    path = write(tmp_path / "t", "old\n")
    tokens = TokenFile(path, reload_interval_s=3600)
    write(path, "new-token\n")
    assert tokens.accepts("old") and not tokens.accepts("new-token")


def test_token_file_reload_interval_is_a_class_default(tmp_path: Path) -> None:
    assert TokenFile.reload_interval_s == 5.0
    assert TokenFile(write(tmp_path / "t", "a\n")).reload_interval_s == 5.0


@pytest.mark.parametrize("breakage", ["empty", "deleted", "bad line"])
def test_token_file_broken_later_keeps_last_good_tokens_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, breakage: str
) -> None:
    path = write(tmp_path / "t", "keep-me\n")
    tokens = TokenFile(path, reload_interval_s=0)
    if breakage == "empty":
        write(path, "")
    elif breakage == "deleted":
        path.unlink()
    else:
        write(path, "leaked token\n")
    with caplog.at_level(logging.INFO, logger="tuneserve.api.security"):
        assert tokens.accepts("keep-me")
        assert tokens.accepts("keep-me")  # the same broken file: one warning, not one per call
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keeping the 1 tokens" in warnings[0].getMessage()
    assert "keep-me" not in caplog.text and "leaked" not in caplog.text
    write(path, "fixed\n")
    os.utime(path, ns=(1, 1))  # a different mtime, even on coarse clocks
    assert tokens.accepts("fixed") and not tokens.accepts("keep-me")


def test_check_bearer_missing_header_is_missing_token(tmp_path: Path) -> None:
    tokens = TokenFile(write(tmp_path / "t", "alpha\n"))
    for metadata in (None, (), (("x-request-id", "1"),)):
        with pytest.raises(errors.Unauthenticated) as caught:
            check_bearer(metadata, tokens)
        assert caught.value.reason == "MISSING_TOKEN"


@pytest.mark.parametrize("value", ["Bearer beta", "Basic alpha", "alpha", "Bearer", "Bearer  "])
def test_check_bearer_wrong_value_is_invalid_token(tmp_path: Path, value: str) -> None:
    tokens = TokenFile(write(tmp_path / "t", "alpha\n"))
    with pytest.raises(errors.Unauthenticated) as caught:
        check_bearer((("authorization", value),), tokens)
    assert caught.value.reason == "INVALID_TOKEN"
    assert "alpha" not in caught.value.message and "beta" not in caught.value.message


@pytest.mark.parametrize("value", ["Bearer alpha", "bearer alpha", "BEARER  alpha "])
def test_check_bearer_accepts_the_scheme_in_any_case(tmp_path: Path, value: str) -> None:
    check_bearer((("authorization", value),), TokenFile(write(tmp_path / "t", "alpha\n")))


def test_unauthenticated_maps_to_its_status_with_error_info() -> None:
    status = to_status(errors.Unauthenticated("no token", reason="MISSING_TOKEN"))
    assert status.code == grpc.StatusCode.UNAUTHENTICATED
    [(_, value)] = [kv for kv in status.trailing_metadata if kv[0] == "grpc-status-details-bin"]
    [detail] = status_pb2.Status.FromString(value).details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain) == ("MISSING_TOKEN", "tuneserve")


def test_server_credentials_none_without_tls_and_built_with_it(tmp_path: Path) -> None:
    assert server_credentials(make_config(tmp_path, tmp_path)) is None  # type: ignore[arg-type]
    tls = write_tls_files(tmp_path)
    config = make_config(
        tmp_path,
        tmp_path,
        tls_cert_file=str(tls["server_cert"]),
        tls_key_file=str(tls["server_key"]),
        tls_client_ca_file=str(tls["ca"]),
    )
    assert isinstance(server_credentials(config), grpc.ServerCredentials)  # type: ignore[arg-type]


def test_certificate_files_are_re_read_only_when_changed_and_usable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = write_tls_files(tmp_path / "old"), write_tls_files(tmp_path / "new")
    live = {name: tmp_path / f"live-{name}.pem" for name in ("cert", "key", "ca")}
    for name, source in (("cert", "server_cert"), ("key", "server_key"), ("ca", "ca")):
        live[name].write_bytes(old[source].read_bytes())
    files = CertificateFiles(live["cert"], live["key"], live["ca"])
    assert isinstance(files.load(), grpc.ServerCertificateConfiguration)
    files.reload_interval_s = 0
    assert files.fetch() is None  # unchanged

    live["cert"].write_bytes(new["server_cert"].read_bytes())  # renewal half written
    with caplog.at_level(logging.WARNING, logger="tuneserve.api.security"):
        assert files.fetch() is None
    assert "keeping the old ones" in caplog.text

    live["key"].write_bytes(new["server_key"].read_bytes())
    os.utime(live["key"], ns=(1, 1))
    assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration)
    assert files.fetch() is None

    files.reload_interval_s = 3600
    live["ca"].write_bytes(new["ca"].read_bytes())
    assert files.fetch() is None  # not looked at before the interval
