"""tuneserve.failpoints: parsing, and a process killed as kill -9 would at the armed hit."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tuneserve import failpoints
from tuneserve.config import ServerConfig
from tuneserve.errors import InvalidArguments


def test_parse_names_and_counts() -> None:
    assert failpoints.parse("") == {}
    assert failpoints.parse("job.step=3, job.published") == {"job.step": 3, "job.published": 1}


@pytest.mark.parametrize("spec", ["job.nope", "job.step=0", "job.step=x", "job.step=²"])
def test_parse_refuses_unknown_names_and_bad_counts(spec: str) -> None:
    with pytest.raises(ValueError):
        failpoints.parse(spec)


def test_config_refuses_a_bad_failpoint_spec() -> None:
    with pytest.raises(InvalidArguments) as info:
        ServerConfig(failpoints="job.nope").validate()
    assert "failpoints" in {p.field for p in info.value.problems}


def test_unarmed_failpoints_do_nothing() -> None:
    failpoints.arm("")
    for name in failpoints.NAMES:
        failpoints.hit(name)


def test_the_nth_hit_kills_the_process_with_sigkill() -> None:
    code = (
        "from tuneserve import failpoints\n"
        "failpoints.arm('job.step=3')\n"
        "for i in range(1, 5):\n"
        "    print(i, flush=True)\n"
        "    failpoints.hit('job.step')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["1", "2", "3"]
