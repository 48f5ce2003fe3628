"""An S3-protocol server for the tests: moto's server mode in a child process on 127.0.0.1,
spoken to over real HTTP by the same boto3 client code a user's S3 or MinIO sees (no MinIO
installs on these machines).

Use the session fixture: `from tests.s3server import s3_endpoint  # noqa: F401`, then take
`s3_endpoint` in a test. Nothing is set in os.environ: pass `s3_endpoint.client()` to an
S3ArtifactStore, or `{**os.environ, **s3_endpoint.env()}` to a server subprocess (whose boto3
then finds the endpoint and the dummy credentials as it would find real ones).

The child binds port 0 and prints the port it got, so two test sessions never race for one;
it exits when its stdin closes, so it dies with the test process even after a `kill -9`."""

from __future__ import annotations

import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tuneserve.storage.artifacts import client_config

_CHILD = """
import logging, sys
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes it, or dies
server.stop()
"""

ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"
REGION = "us-east-1"


@dataclass
class S3Endpoint:
    url: str
    """http://127.0.0.1:PORT, the endpoint URL a client needs."""
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """The AWS_* variables a process needs to reach this server with boto3's defaults.
        botocore reads the region from AWS_DEFAULT_REGION; other SDKs read AWS_REGION."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    _session: Any = field(default=None, repr=False)

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server, with the stores' configuration; `config`
        overrides single settings (retries, timeouts). Not to be called from several threads
        at once (one boto3 session makes them all: it loads the S3 model once)."""
        if self._session is None:
            import boto3

            self._session = boto3.session.Session(
                aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY,
                region_name=REGION,
            )
        return self._session.client("s3", endpoint_url=self.url, config=client_config(**config))

    def make_bucket(self, prefix: str = "test") -> str:
        """A new empty bucket with a fresh name."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.terminate()  # quicker than the server's own shutdown, and as clean
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_s3_server(*, timeout_s: float = 30.0) -> S3Endpoint:
    """Start moto's S3 server in a child process and return once it answers HTTP."""
    process = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    try:
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        line = process.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            raise RuntimeError(f"the S3 server did not start (exit status {process.poll()})")
        endpoint = S3Endpoint(url=f"http://127.0.0.1:{int(line)}", process=process)
        while True:
            try:
                urllib.request.urlopen(endpoint.url, timeout=1).close()
                return endpoint
            except urllib.error.HTTPError:
                return endpoint  # an S3 error answer is an answer
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
    except BaseException:
        process.kill()
        process.wait()
        raise


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """One S3 server for the session; each test makes its own bucket (`make_bucket`)."""
    endpoint = start_s3_server()
    try:
        yield endpoint
    finally:
        endpoint.stop()
