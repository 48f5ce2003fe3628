"""The transport, client and CLI must not import torch: a client-only install has no torch,
and the CLI must start fast."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = ["tuneserve.api.servicer", "tuneserve.api.server", "tuneserve_client", "tuneserve.cli"]


@pytest.mark.parametrize("module", MODULES)
def test_module_does_not_import_torch(module: str) -> None:
    code = (
        f"import {module}, sys\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "assert 'torch' not in sys.modules, heavy\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_cli_help_does_not_import_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from tuneserve.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['serve', '--help'])\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
