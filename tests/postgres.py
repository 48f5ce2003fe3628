"""A real PostgreSQL server for the tests: one cluster per test session, started on first
use from the installed server binaries (Debian's /usr/lib/postgresql/N/bin; `make test`
installs them), on a free port on 127.0.0.1, with its data in a temporary directory removed
at the end. PostgreSQL refuses to run as root, so under root (CI) it runs as the `postgres`
system user the Debian package creates.

    url = fresh_database(request)         # a new, empty database for one test
    server = postgres_server()            # the session's server, for end-to-end tests
    server.stop(); ...; server.start()    # down for a while, back on the same port and data

Tests connect as `tuneserve`, an ordinary role that owns its databases (not a superuser,
as in production), with trust authentication; `PASSWORD_USER` logs in with
`PASSWORD_USER_PASSWORD` only (SCRAM), for the credential tests. Without the binaries the
tests fail, or are skipped when TUNESERVE_TEST_ALLOW_NO_POSTGRES is set."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

USER = "tuneserve"
PASSWORD_USER = "tuneserve_pw"
PASSWORD_USER_PASSWORD = "s3cret-Pa55"
SUPERUSER = "postgres"
SERVER_USER = "postgres"  # the OS user the server runs as under root
ALLOW_MISSING = "TUNESERVE_TEST_ALLOW_NO_POSTGRES"

# Speed over durability: the cluster lives for one test session.
SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
log_min_messages = warning
"""
HBA = f"""
local all all trust
host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""


class PostgresServer:
    """One PostgreSQL cluster in `root` (its data, socket and log), served on `port`."""

    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir, self.root, self.port = bindir, root, port
        self.data = root / "data"
        self.log = root / "server.log"
        self.running = False

    @classmethod
    def create(cls, bindir: Path) -> PostgresServer:
        """initdb a new cluster in a temporary directory and start it on a free port."""
        root = Path(tempfile.mkdtemp(prefix="tuneserve-pg-"))
        server = cls(bindir, root, _free_port())
        if os.geteuid() == 0:
            account = _server_account()
            os.chown(root, account.pw_uid, account.pw_gid)
        server._run(
            "initdb", "-D", str(server.data), "-U", SUPERUSER, "--auth=trust", "--no-sync",
            "--encoding=UTF8", "--no-locale",
        )  # fmt: skip
        (server.data / "pg_hba.conf").write_text(HBA)
        server._configure()
        for attempt in range(3):  # the port was free a moment ago; another may take it
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == 2 or "could not bind" not in server._log_tail():
                    raise
                server.port = _free_port()
                server._configure()  # the last setting of a name wins
        server._admin(
            f"CREATE ROLE {USER} LOGIN",
            f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD_USER_PASSWORD}'",
        )
        return server

    def _configure(self) -> None:
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(SETTINGS.format(port=self.port, socket_dir=self.root))

    def url(self, dbname: str, *, user: str = USER, password: str = "") -> str:
        secret = f":{password}" if password else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, *, owner: str = USER) -> str:
        """A new empty database; its URL, for its owner (who may create tables in it)."""
        name = f"test_{uuid.uuid4().hex}"
        self._admin(f"CREATE DATABASE {name} OWNER {owner}")
        return self.url(name, user=owner)

    def drop_database(self, url: str) -> None:
        """Drop a database `create_database` made, closing whatever is still connected."""
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(psycopg.Error):  # the server may be stopped
            self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def start(self) -> None:
        """Start (again) on the same port and data; returns once it accepts connections."""
        try:
            self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"
            )
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n--- {self.log}:\n{self._log_tail()}") from None
        self.running = True

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server: "fast" ends every session (clients see AdminShutdown),
        "immediate" is a crash (recovery at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def destroy(self) -> None:
        """Stop the server if it runs and remove its directory."""
        if self.running:
            with contextlib.suppress(RuntimeError):
                self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A superuser connection, for tests that look under the store."""
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=dbname, **kwargs
        )

    def _admin(self, *statements: str) -> None:
        with self.connect(autocommit=True, connect_timeout=10) as conn:
            for statement in statements:
                conn.execute(statement.encode())

    def _run(self, program: str, *args: str) -> None:
        """Run one of the server's programs, as the server's user under root."""
        command = [str(self.bindir / program), *args]
        account: dict[str, Any] = {}
        if os.geteuid() == 0:
            pw = _server_account()
            account = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        done = subprocess.run(
            command,
            cwd=self.root,  # a directory the server's user may enter
            env={**_clean_env(), "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **account,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
            )

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"


_server: PostgresServer | None = None
_server_lock = threading.Lock()


def postgres_server() -> PostgresServer:
    """The session's server, started on first use and removed when the process exits.
    Fails the test (or skips it, with TUNESERVE_TEST_ALLOW_NO_POSTGRES) when PostgreSQL is
    not installed."""
    global _server
    with _server_lock:
        if _server is None:
            bindir = find_bindir()
            if bindir is None:
                message = (
                    "PostgreSQL's server binaries (initdb, pg_ctl) were not found in "
                    "/usr/lib/postgresql/*/bin or on PATH: run `make postgresql` (apt-get "
                    f"install postgresql), or set {ALLOW_MISSING}=1 to skip these tests"
                )
                if os.environ.get(ALLOW_MISSING):
                    pytest.skip(message)
                pytest.fail(message, pytrace=False)
            _server = PostgresServer.create(bindir)
            atexit.register(_server.destroy)
        if not _server.running:  # a test stopped it and failed before starting it again
            _server.start()
        return _server


def fresh_database(request: pytest.FixtureRequest) -> str:
    """A new empty database for the requesting test (dropped after it); its URL."""
    server = postgres_server()
    url = server.create_database()
    request.addfinalizer(lambda: server.drop_database(url))
    return url


def find_bindir() -> Path | None:
    """The newest Debian install (/usr/lib/postgresql/N/bin), else initdb's on PATH."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if found:
        return max(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)])
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _server_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise RuntimeError(
            f"PostgreSQL will not run as root and there is no {SERVER_USER!r} user to run it "
            "as (Debian's postgresql package creates it)"
        ) from None


def _clean_env() -> dict[str, str]:
    """The environment without libpq's and the server's variables (PGDATA, PGPORT, ...)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
