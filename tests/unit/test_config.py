"""tuneserve.config: flags over environment, parsing, and validation of every setting."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tuneserve.config import ServerConfig, add_arguments, config_from_flags, load_config
from tuneserve.errors import InvalidArgument, InvalidArguments


def problem_fields(exc: InvalidArgument) -> set[str]:
    problems = exc.problems if isinstance(exc, InvalidArguments) else [exc]
    return {p.field for p in problems}


def test_flags_alone_build_a_config_with_defaults() -> None:
    cfg = config_from_flags(["--base-model", "gpt2"], env={})
    assert cfg.base_model == "gpt2"
    assert cfg.listen == ServerConfig().listen
    assert cfg.max_new_tokens == 2048
    assert cfg.dataset_roots == ()
    assert cfg.data_dir.is_absolute()
    assert cfg.db_path == cfg.data_dir / "jobs.sqlite3"


def test_environment_fills_settings_and_converts_types() -> None:
    env = {
        "TUNESERVE_BASE_MODEL": "env-model",
        "TUNESERVE_MAX_NEW_TOKENS": "100",
        "TUNESERVE_GRACE_PERIOD_S": "2.5",
        "TUNESERVE_LOG_LEVEL": "debug",
    }
    cfg = config_from_flags([], env=env)
    assert cfg.base_model == "env-model"
    assert cfg.max_new_tokens == 100
    assert cfg.grace_period_s == 2.5
    assert cfg.log_level == "DEBUG"


def test_flag_wins_over_environment() -> None:
    env = {"TUNESERVE_BASE_MODEL": "env-model", "TUNESERVE_MAX_DATASET_ROWS": "5"}
    cfg = config_from_flags(["--base-model", "flag-model"], env=env)
    assert cfg.base_model == "flag-model"
    assert cfg.max_dataset_rows == 5  # not given as a flag: the environment still applies


def test_load_config_reads_os_environ_when_no_env_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNESERVE_BASE_MODEL", "from-os-environ")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert load_config(parser.parse_args([])).base_model == "from-os-environ"


def test_empty_environment_value_means_unset() -> None:
    cfg = config_from_flags(["--base-model", "m"], env={"TUNESERVE_LISTEN": ""})
    assert cfg.listen == "0.0.0.0:50051"


def test_dataset_roots_from_environment_split_on_colon(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    env = {"TUNESERVE_BASE_MODEL": "m", "TUNESERVE_DATASET_ROOTS": f"{a}:{b}"}
    assert config_from_flags([], env=env).dataset_roots == (a.resolve(), b.resolve())


def test_dataset_roots_flag_repeats_and_wins_over_environment(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    env = {"TUNESERVE_DATASET_ROOTS": str(c)}
    cfg = config_from_flags(
        ["--base-model", "m", "--dataset-roots", str(a), "--dataset-roots", str(b)], env=env
    )
    assert cfg.dataset_roots == (a.resolve(), b.resolve())


def test_missing_base_model_is_reported_by_name() -> None:
    with pytest.raises(InvalidArgument) as info:
        config_from_flags([], env={})
    assert info.value.field == "base_model"
    assert "base_model" in info.value.message


@pytest.mark.parametrize("listen", ["localhost", "localhost:http", "localhost:65536", "1.2.3.4:"])
def test_bad_listen_address_is_rejected(listen: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        config_from_flags(["--base-model", "m", "--listen", listen], env={})
    assert problem_fields(info.value) == {"listen"}


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::]:50051", "localhost:65535"])
def test_good_listen_address_is_accepted(listen: str) -> None:
    assert config_from_flags(["--base-model", "m", "--listen", listen], env={}).listen == listen


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    flags = [
        "--listen", "nowhere",
        "--device", "tpu",
        "--dtype", "int4",
        "--max-job-attempts", "0",
        "--log-format", "xml",
        "--stream-interval-ms", "-5",
        "--dataset-roots", str(tmp_path / "missing"),
    ]  # fmt: skip
    with pytest.raises(InvalidArguments) as info:
        config_from_flags(flags, env={})
    assert problem_fields(info.value) == {
        "base_model",
        "listen",
        "device",
        "dtype",
        "max_job_attempts",
        "log_format",
        "stream_interval_ms",
        "dataset_roots",
    }
    # The summary message names each problem too.
    assert "listen" in info.value.message and "dtype" in info.value.message


def test_default_max_new_tokens_must_not_exceed_the_limit() -> None:
    with pytest.raises(InvalidArgument) as info:
        config_from_flags(["--base-model", "m", "--max-new-tokens", "10"], env={})
    assert problem_fields(info.value) == {"default_max_new_tokens"}


def test_non_number_is_rejected_naming_the_setting() -> None:
    with pytest.raises(InvalidArgument) as info:
        config_from_flags(["--base-model", "m"], env={"TUNESERVE_MAX_DATASET_ROWS": "lots"})
    assert info.value.field == "max_dataset_rows"
    assert "lots" in info.value.message


def test_non_number_is_reported_together_with_other_problems() -> None:
    with pytest.raises(InvalidArgument) as info:
        config_from_flags(["--max-dataset-rows", "lots", "--listen", "nowhere"], env={})
    assert problem_fields(info.value) == {"max_dataset_rows", "base_model", "listen"}


# --- TLS, mutual TLS, bearer tokens and the health port ---------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support import write_tls_files

    return write_tls_files(tmp_path_factory.mktemp("tls"))


def test_security_settings_read_from_environment(
    tls_files: dict[str, Path], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t0k3n\n")
    env = {
        "TUNESERVE_BASE_MODEL": "m",
        "TUNESERVE_TLS_CERT_FILE": str(tls_files["server_cert"]),
        "TUNESERVE_TLS_KEY_FILE": str(tls_files["server_key"]),
        "TUNESERVE_TLS_CLIENT_CA_FILE": str(tls_files["ca"]),
        "TUNESERVE_AUTH_TOKENS_FILE": str(tokens),
        "TUNESERVE_HEALTH_LISTEN": "0.0.0.0:8081",
    }
    cfg = config_from_flags([], env=env)
    assert cfg.tls_cert_file == str(tls_files["server_cert"])
    assert cfg.tls_key_file == str(tls_files["server_key"])
    assert cfg.tls_client_ca_file == str(tls_files["ca"])
    assert cfg.auth_tokens_file == str(tokens)
    assert cfg.health_listen == "0.0.0.0:8081"


def test_security_settings_as_flags_default_off(tls_files: dict[str, Path]) -> None:
    off = config_from_flags(["--base-model", "m"], env={})
    assert (off.tls_cert_file, off.auth_tokens_file, off.health_listen) == ("", "", "")
    cfg = config_from_flags(
        [
            "--base-model",
            "m",
            "--tls-cert-file",
            str(tls_files["server_cert"]),
            "--tls-key-file",
            str(tls_files["server_key"]),
            "--health-listen",
            "127.0.0.1:0",
        ],
        env={},
    )
    assert cfg.tls_cert_file == str(tls_files["server_cert"]) and cfg.health_listen.endswith(":0")


@pytest.mark.parametrize(
    ("settings", "fields"),
    [
        ({"tls_cert_file": "server_cert"}, {"tls_key_file"}),
        ({"tls_key_file": "server_key"}, {"tls_cert_file"}),
        ({"tls_client_ca_file": "ca"}, {"tls_client_ca_file"}),
        ({"tls_cert_file": "server_key", "tls_key_file": "server_key"}, {"tls_cert_file"}),
        ({"tls_cert_file": "server_cert", "tls_key_file": "client_key"}, {"tls_key_file"}),
        ({"tls_cert_file": "server_cert", "tls_key_file": "server_cert"}, {"tls_key_file"}),
        (
            {
                "tls_cert_file": "server_cert",
                "tls_key_file": "server_key",
                "tls_client_ca_file": "server_key",
            },
            {"tls_client_ca_file"},
        ),
    ],
)
def test_tls_files_must_pair_up_parse_and_match(
    tls_files: dict[str, Path], settings: dict[str, str], fields: set[str]
) -> None:
    values = {name: str(tls_files[file]) for name, file in settings.items()}
    with pytest.raises(InvalidArgument) as info:
        ServerConfig(base_model="m", **values).validate()
    assert problem_fields(info.value) == fields


def test_tls_files_that_do_not_exist_or_are_not_pem_are_reported_together(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(InvalidArgument) as info:
        ServerConfig(
            base_model="m",
            tls_cert_file=str(garbage),
            tls_key_file=str(tmp_path / "absent-key.pem"),
            tls_client_ca_file=str(tmp_path / "absent-ca.pem"),
            auth_tokens_file=str(tmp_path / "absent-tokens"),
        ).validate()
    assert problem_fields(info.value) == {
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "auth_tokens_file",
    }
    assert "absent-key.pem" in info.value.message and "no PEM certificate" in info.value.message


def test_complete_tls_and_tokens_configuration_is_accepted(
    tls_files: dict[str, Path], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# one\nt0k3n\n")
    ServerConfig(
        base_model="m",
        tls_cert_file=str(tls_files["server_cert"]),
        tls_key_file=str(tls_files["server_key"]),
        tls_client_ca_file=str(tls_files["ca"]),
        auth_tokens_file=str(tokens),
        health_listen="0.0.0.0:8081",
    ).validate()


@pytest.mark.parametrize("text", ["", "# nothing but comments\n\n"])
def test_empty_tokens_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        ServerConfig(base_model="m", auth_tokens_file=str(tokens)).validate()
    assert problem_fields(info.value) == {"auth_tokens_file"}
    assert "no tokens" in info.value.message


@pytest.mark.parametrize("address", ["8081", "localhost", "host:port", ":8081"])
def test_bad_health_listen_address_is_rejected(address: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        ServerConfig(base_model="m", health_listen=address).validate()
    assert problem_fields(info.value) == {"health_listen"}
