"""End to end: the Node.js example (clients/node) against the real server: it trains an
adapter, follows the job to SUCCEEDED and streams a generation with it, in plaintext and over
mutual TLS with a bearer token; a refused call's rich details (google.rpc.Status) are decoded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT, make_config, write_tls_files

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("node") is None, reason="needs the node binary"),
]

NODE_DIR = ROOT / "clients" / "node"


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """`make setup` installs them; a checkout without them gets `npm ci` once here."""
    installed = NODE_DIR / "node_modules" / "@grpc" / "grpc-js"
    if not installed.is_dir():
        npm = shutil.which("npm")
        assert npm, "clients/node has no node_modules and npm is missing: run make setup"
        subprocess.run(
            [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return installed


def run_example(*args: str, script: str = "example.js") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    if script == "example.js":
        args = ("--steps", "6", *args)
    return subprocess.run(
        ["node", str(NODE_DIR / script), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def assert_trained_and_generated(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("progress: RUNNING step ") for line in lines), done.stdout
    assert any(" SUCCEEDED adapter=" in line for line in lines), done.stdout
    generation = next(line for line in lines if line.startswith("generation: "))
    assert len(generation) > len("generation: Question: Who is your father? Answer:")
    assert "generated tokens" in lines[-1]


def test_node_example_trains_follows_and_streams(
    node_modules: Path, tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    server = server_factory(make_config(tiny_gpt2, tmp_path))
    assert_trained_and_generated(run_example("--target", server.target))
    # Errors exit non-zero with the status code and the bad field: an adapter id refused.
    bad = run_example("--target", server.target, "--adapter-id", "Not Valid!")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert bad.stderr.startswith("error: INVALID_ARGUMENT adapter_id: "), bad.stderr
    assert "(reason INVALID_ARGUMENT)" in bad.stderr
    # The details of a refused call are decoded: a dataset row with an empty response.
    refused = run_example("--target", server.target, script="errors.js")
    assert refused.returncode == 0, refused.stdout + refused.stderr
    error = json.loads(refused.stdout)
    field = "dataset.inline.rows[1].response"
    assert error["code"] == "INVALID_ARGUMENT" and error["reason"] == "INVALID_ARGUMENT"
    assert error["domain"] == "tuneserve" and error["field"] == field and error["row"] == 1
    assert [v["field"] for v in error["violations"]] == [field]
    assert error["details"].startswith(field) and error["retryAfterMs"] is None


def test_node_example_over_mutual_tls_with_a_token(
    node_modules: Path, tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    pki = write_tls_files(tmp_path)
    (tmp_path / "tokens").write_text("node-token\n")
    server = server_factory(
        make_config(
            tiny_gpt2,
            tmp_path / "data",
            tls_cert_file=str(pki["server_cert"]),
            tls_key_file=str(pki["server_key"]),
            tls_client_ca_file=str(pki["ca"]),
            auth_tokens_file=str(tmp_path / "tokens"),
        )
    )
    tls = ["--ca", str(pki["ca"]), "--cert", str(pki["client_cert"])]
    tls += ["--key", str(pki["client_key"])]
    assert_trained_and_generated(
        run_example("--target", server.target, *tls, "--token", "node-token")
    )
    refused = run_example("--target", server.target, *tls)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
