"""The server's one configuration object: declared once, validated once at start-up, passed
down. Every setting is a flag (`--base-model`) and an environment variable
(`TUNESERVE_BASE_MODEL`); a flag wins over the environment. The `help` of each field is its
documentation and is what `tuneserve serve --help` prints."""

from __future__ import annotations

import argparse
import dataclasses
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneserve import failpoints
from tuneserve.data.chat_template import RenderLimits
from tuneserve.errors import InvalidArgument, collect

ENV_PREFIX = "TUNESERVE_"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    base_model: str = _opt(
        "", "Base model: a Hugging Face Hub id (e.g. gpt2) or a local directory."
    )
    device: str = _opt(
        "auto", "Torch device: auto (cuda if present, else cpu), cpu, cuda or cuda:N."
    )
    dtype: str = _opt(
        "auto",
        "Weights dtype: auto (bfloat16 on CUDA that supports it, else float32), "
        "float32, bfloat16 or float16.",
    )
    listen: str = _opt("0.0.0.0:50051", "gRPC listen address host:port; port 0 picks a free one.")
    metrics_listen: str = _opt(
        "0.0.0.0:9090", "Prometheus /metrics over HTTP, host:port; port 0 picks a free one."
    )
    health_listen: str = _opt(
        "",
        "A second, plaintext gRPC port serving only grpc.health.v1, host:port (port 0 picks "
        "a free one), for Kubernetes gRPC probes when the main port speaks TLS. Empty: off.",
    )
    tls_cert_file: str = _opt(
        "",
        "PEM certificate chain (server certificate first); with tls_key_file, the main gRPC "
        "port speaks TLS. Empty: plaintext.",
    )
    tls_key_file: str = _opt("", "PEM private key of tls_cert_file (unencrypted).")
    tls_client_ca_file: str = _opt(
        "",
        "PEM CA certificate(s): mutual TLS, every client must present a certificate signed "
        "by one of them. Needs tls_cert_file. Empty: no client certificates asked for.",
    )
    auth_tokens_file: str = _opt(
        "",
        "Bearer tokens, one per line (blank lines and lines starting with # ignored): every "
        "call except grpc.health.v1 must send metadata 'authorization: Bearer <token>'. "
        "Re-read when it changes (a rotated Secret). Empty: no tokens asked for.",
    )
    data_dir: Path = _opt(
        Path("tuneserve-data"),
        "This replica's own files: the embedded job store and artifact store (when those "
        "settings are empty), the local adapter cache and a job's scratch files.",
    )
    role: str = _opt(
        "all",
        "What this replica does: all (serve and train: one process is the whole service), "
        "serve (generation and every read; TrainJob queues into the shared store) or train "
        "(claims and runs training jobs; answers reads too).",
    )
    job_store: str = _opt(
        "",
        "The job store every replica shares: empty for SQLite in the data directory, "
        "sqlite:///path, or postgresql://user@host:5432/db?sslmode=... (the password from "
        "libpq's PGPASSWORD or PGPASSFILE; never put it in the URL).",
    )
    artifact_store: str = _opt(
        "",
        "Where adapters, checkpoints and dataset snapshots are kept: empty for a directory in "
        "the data directory, a directory (a ReadWriteMany volume shared by replicas), or "
        "s3://bucket/prefix on S3 or an S3-compatible store (endpoint and credentials as the "
        "AWS SDKs read them: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_REGION).",
    )
    replica_id: str = _opt(
        "",
        "This replica's name, which holds its training jobs' leases (a pod's name). A "
        "replica restarted under the same name resumes its jobs at once; others wait out "
        "the lease. Empty: the host name.",
    )
    lease_s: float = _opt(
        30.0,
        "A training job's lease: renewed every third of it while the job runs; a replica "
        "that stops renewing loses the job to another after this long.",
    )
    adapter_cache_bytes: int = _opt(
        10 * 1024**3,
        "Bytes of adapter files pulled from object storage kept on local disk (least "
        "recently used go first).",
    )
    dataset_roots: tuple[Path, ...] = _opt(
        (),
        "Directories TrainJob may read dataset files from (repeat the flag; in the "
        "environment, separate with ':'). Empty: only inline datasets.",
        multiple=True,
    )
    adapter_import_roots: tuple[Path, ...] = _opt(
        (),
        "Directories ImportAdapter may read PEFT adapters from (repeat the flag; in the "
        "environment, separate with ':'). Empty: no imports.",
        multiple=True,
    )
    training_yield_s: float = _opt(
        0.2,
        "Co-serving: before each training step, wait up to this long while generation "
        "requests are running or waiting (0: no yielding).",
    )
    grace_period_s: float = _opt(10.0, "On SIGTERM, seconds in-flight calls get to finish.")
    max_dataset_rows: int = _opt(100_000, "Most rows a dataset may have.")
    max_dataset_bytes: int = _opt(256 * 1024 * 1024, "Largest dataset file or request, in bytes.")
    max_prompt_tokens: int = _opt(4096, "Longest prompt Generate accepts, in tokens.")
    max_new_tokens: int = _opt(2048, "Largest max_new_tokens Generate accepts.")
    default_max_new_tokens: int = _opt(64, "max_new_tokens when a request leaves it unset.")
    max_loaded_adapters: int = _opt(8, "Adapters kept loaded in memory (least recently used go).")
    max_batch_size: int = _opt(32, "Generation requests decoded together in one batch.")
    stream_interval_ms: float = _opt(
        20.0,
        "GenerateStream: at most one message per stream this often; the tokens of the steps "
        "in between go together (the first after a quiet spell and the last go at once). "
        "Fewer messages leave the decoder more CPU under load. 0: a message per token.",
    )
    max_queued_requests: int = _opt(
        256, "Generation requests waiting for a batch slot; past it, RESOURCE_EXHAUSTED."
    )
    max_job_attempts: int = _opt(
        3, "Starts a job gets across restarts before an interrupted job is marked FAILED."
    )
    max_queued_jobs: int = _opt(
        64,
        "Training jobs queued or running at once; past it TrainJob answers RESOURCE_EXHAUSTED "
        "with a retry hint.",
    )
    max_queued_jobs_per_caller: int = _opt(
        16,
        "Training jobs queued or running at once for one caller (one bearer token; without "
        "tokens, all callers are one), so one caller's burst cannot fill the whole queue.",
    )
    max_message_bytes: int = _opt(64 * 1024 * 1024, "Largest gRPC message accepted.")
    chat_template_render_timeout_s: float = _opt(
        2.0,
        "A user's chat template renders in a worker process; one rendering (of one "
        "conversation or a prefix of it) may take this long, or the request is refused.",
    )
    chat_template_max_output_bytes: int = _opt(
        1024 * 1024, "Largest text one chat template rendering may produce, in bytes."
    )
    chat_template_max_memory_bytes: int = _opt(
        256 * 1024 * 1024,
        "Memory one chat template rendering may allocate, in bytes (above the worker "
        "process's own size).",
    )
    chat_template_workers: int = _opt(
        2, "Worker processes rendering chat templates at once; other renders wait for one."
    )
    log_format: str = _opt("text", "Log format: text or json.")
    log_level: str = _opt("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.")
    failpoints: str = _opt(
        "",
        "Testing only: kill the process (SIGKILL) at named instants of a job's life, "
        "name[=n],... (the n-th hit); see tuneserve/failpoints.py. Empty: off.",
    )

    def render_limits(self) -> RenderLimits:
        """The bounds a user's chat template renders under (data/chat_template.py)."""
        return RenderLimits(
            render_timeout_s=self.chat_template_render_timeout_s,
            check_timeout_s=max(5.0, self.chat_template_render_timeout_s),
            max_output_bytes=self.chat_template_max_output_bytes,
            max_memory_bytes=self.chat_template_max_memory_bytes,
            workers=self.chat_template_workers,
        )

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def artifacts_dir(self) -> Path:
        """The embedded artifact store's directory."""
        return self.data_dir / "artifacts"

    @property
    def legacy_adapters_dir(self) -> Path:
        """Where the single-process releases kept adapters (moved at start-up)."""
        return self.data_dir / "adapters"

    @property
    def serves(self) -> bool:
        return self.role in ("all", "serve")

    @property
    def trains(self) -> bool:
        return self.role in ("all", "train")

    @property
    def worker_id(self) -> str:
        import socket

        return self.replica_id or socket.gethostname()

    def validate(self, *, earlier: Sequence[InvalidArgument] = ()) -> ServerConfig:
        """Every problem at once (with `earlier` ones, from reading the values), as
        InvalidArgument naming the setting."""
        problems: list[InvalidArgument] = list(earlier)

        def bad(name: str, message: str) -> None:
            problems.append(InvalidArgument(f"{name}: {message}", field=name))

        if self.role not in ("all", "serve", "train"):
            bad("role", f"{self.role!r} is not all, serve or train")
        if not self.lease_s >= 3:
            bad("lease_s", "must be at least 3 seconds (it is renewed every third of it)")
        if self.adapter_cache_bytes < 0:
            bad("adapter_cache_bytes", "must not be negative")
        if not self.base_model:
            bad("base_model", "required (a Hub id such as gpt2, or a local model directory)")
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            bad("device", f"{self.device!r} is not auto, cpu, cuda or cuda:N")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad("dtype", f"{self.dtype!r} is not auto, float32, bfloat16 or float16")
        for name in ("listen", "metrics_listen", "health_listen"):
            if name == "health_listen" and not self.health_listen:
                continue
            host, sep, port = getattr(self, name).rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                bad(name, f"{getattr(self, name)!r} is not host:port")
        for name in ("dataset_roots", "adapter_import_roots"):
            for root in getattr(self, name):
                if not root.is_dir():
                    bad(name, f"{root} is not a directory")
        for name, message in _security_problems(self):
            bad(name, message)
        if not self.chat_template_render_timeout_s > 0:
            bad("chat_template_render_timeout_s", "must be positive")
        if self.chat_template_max_memory_bytes < 16 * 1024 * 1024:
            bad("chat_template_max_memory_bytes", "must be at least 16 MiB")
        if self.training_yield_s < 0:
            bad("training_yield_s", "must not be negative")
        for name in (
            "max_dataset_rows",
            "max_dataset_bytes",
            "max_prompt_tokens",
            "max_new_tokens",
            "default_max_new_tokens",
            "max_loaded_adapters",
            "max_job_attempts",
            "max_message_bytes",
            "max_batch_size",
            "max_queued_requests",
            "max_queued_jobs",
            "max_queued_jobs_per_caller",
            "chat_template_max_output_bytes",
            "chat_template_workers",
        ):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if self.default_max_new_tokens > self.max_new_tokens:
            bad("default_max_new_tokens", "must not exceed max_new_tokens")
        if self.stream_interval_ms < 0:
            bad("stream_interval_ms", "must not be negative")
        if self.grace_period_s < 0:
            bad("grace_period_s", "must not be negative")
        try:
            failpoints.parse(self.failpoints)
        except ValueError as e:
            bad("failpoints", str(e))
        if self.log_format not in ("text", "json"):
            bad("log_format", f"{self.log_format!r} is not text or json")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            bad("log_level", f"{self.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
        collect(problems)
        return dataclasses.replace(
            self,
            data_dir=self.data_dir.resolve(),
            dataset_roots=tuple(r.resolve() for r in self.dataset_roots),
            adapter_import_roots=tuple(r.resolve() for r in self.adapter_import_roots),
            log_level=self.log_level.upper(),
        )


def _security_problems(config: ServerConfig) -> list[tuple[str, str]]:
    """TLS files that pair up, exist and parse (the key must match the certificate), and a
    tokens file with at least one token. Checked with the standard ssl module, which reads
    PEM the way gRPC's BoringSSL does, so a file that passes here loads there."""
    problems: list[tuple[str, str]] = []
    cert, key, ca = config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file
    if cert and not key:
        problems.append(("tls_key_file", "required with tls_cert_file"))
    if key and not cert:
        problems.append(("tls_cert_file", "required with tls_key_file"))
    if ca and not cert:
        problems.append(("tls_client_ca_file", "needs tls_cert_file and tls_key_file"))
    texts: dict[str, str] = {}
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        path = getattr(config, name)
        if not path:
            continue
        try:
            texts[name] = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as e:
            problems.append((name, f"cannot read {path}: {_reason(e)}"))
    if "tls_cert_file" in texts:
        if not _holds_certificates(texts["tls_cert_file"]):
            problems.append(("tls_cert_file", f"{cert} holds no PEM certificate"))
        elif "tls_key_file" in texts:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=b"")
            except (ssl.SSLError, OSError) as e:
                problems.append(
                    (
                        "tls_key_file",
                        f"{key} is not an unencrypted PEM private key for {cert}: {_reason(e)}",
                    )
                )
    if "tls_client_ca_file" in texts and not _holds_certificates(texts["tls_client_ca_file"]):
        problems.append(("tls_client_ca_file", f"{ca} holds no PEM certificate"))
    if config.auth_tokens_file:
        try:
            read_auth_tokens(config.auth_tokens_file)
        except (OSError, ValueError) as e:
            problems.append(("auth_tokens_file", f"{config.auth_tokens_file}: {_reason(e)}"))
    return problems


def _holds_certificates(pem: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError):
        return False
    return True


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def read_auth_tokens(path: str | Path) -> frozenset[str]:
    """The bearer tokens in `path`: one per line, surrounding whitespace stripped, blank lines
    and lines starting with # skipped. Raises OSError when the file cannot be read and
    ValueError when it holds no token or a line is not one token; messages name the line,
    never its text, since that would be a secret."""
    tokens: set[str] = set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise ValueError(f"line {number} is not one token (printable ASCII, no spaces)")
        tokens.add(token)
    if not tokens:
        raise ValueError("no tokens (one per line; blank lines and # comments are skipped)")
    return frozenset(tokens)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are left unset so the environment can fill them."""
    for f in dataclasses.fields(ServerConfig):
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata["help"]}
        if f.metadata.get("multiple"):
            kwargs["action"] = "append"
        parser.add_argument(_flag(f.name), **kwargs)


def _convert(f: dataclasses.Field[Any], raw: Any) -> Any:
    kind: type = type(f.default)
    if f.metadata.get("multiple"):
        items = raw.split(os.pathsep) if isinstance(raw, str) else raw
        return tuple(Path(p) for p in items if p)
    if kind is bool:
        return str(raw).lower() in ("1", "true", "yes", "on")
    if kind is int or kind is float:
        try:
            return kind(raw)
        except ValueError:
            raise InvalidArgument(f"{f.name}: {raw!r} is not a number", field=f.name) from None
    if issubclass(kind, Path):
        return Path(raw)
    return str(raw)


def load_config(
    args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """Build and validate the configuration from parsed flags over environment variables."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    problems: list[InvalidArgument] = []
    for f in dataclasses.fields(ServerConfig):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None and raw != "":
            try:
                values[f.name] = _convert(f, raw)
            except InvalidArgument as e:
                problems.append(e)
    return ServerConfig(**values).validate(earlier=problems)


def config_from_flags(argv: Sequence[str], env: Mapping[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_config(parser.parse_args(list(argv)), env)
