"""tuneserve.data.chat_template: user chat templates rendered as transformers renders them,
in worker processes, under time, output and memory bounds, and cancellable."""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tuneserve.data.chat_template import (
    RenderCancelled,
    RendererClosed,
    RenderLimits,
    TemplateRenderer,
    special_tokens_of,
)
from tuneserve.errors import InvalidArgument

LIMITS = RenderLimits(render_timeout_s=1.0, kill_grace_s=0.5, workers=2)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is your father? Héllo, 日本"},
    {"role": "assistant", "content": "I am your father."},
]
SIMPLE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
SIMPLE_OUT = [
    "system: Be brief.\n",
    "system: Be brief.\nuser: Who is your father? Héllo, 日本\n",
    "system: Be brief.\nuser: Who is your father? Héllo, 日本\nassistant: I am your father.\n",
]
NESTED = "{% for i in range(90000) %}{% for j in range(90000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def renderer() -> Iterator[TemplateRenderer]:
    with TemplateRenderer(LIMITS) as r:
        r.start(wait=True)
        yield r


def ready(renderer: TemplateRenderer) -> TemplateRenderer:
    """Both workers started (an earlier test may have had one replaced)."""
    renderer.start(wait=True)
    return renderer


def simple(renderer: TemplateRenderer) -> list[list[str]]:
    return renderer.render_prefixes([CHAT], SIMPLE, special_tokens={})


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(
            "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
            "{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
            "{% else %}{{ bos_token }}{{ m['content'] }}\n{% endif %}{% endfor %}",
            id="generation",
        ),
        pytest.param(
            "{{ strftime_now('%Y-%m-%d') }}\n{% for m in messages %}{{ m.content }}{% endfor %}",
            id="strftime_now",
        ),
        pytest.param(
            "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
            "{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}",
            id="loop-controls",
        ),
        pytest.param(
            "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
            "{{ m | tojson }}{% endfor %}{{ ns.n }}{{ pad_token }}",
            id="namespace-tojson",
        ),
    ],
)
def test_renders_every_prefix_as_apply_chat_template_does(
    renderer: TemplateRenderer, bos_tokenizer: Any, template: str
) -> None:
    [prefixes] = renderer.render_prefixes(
        [CHAT], template, special_tokens=special_tokens_of(bos_tokenizer)
    )
    expected = [
        bos_tokenizer.apply_chat_template(CHAT[: i + 1], chat_template=template, tokenize=False)
        for i in range(len(CHAT))
    ]
    assert prefixes == expected


def test_nested_loops_time_out_within_the_bound_and_others_still_answer(
    renderer: TemplateRenderer,
) -> None:
    ready(renderer)
    outcome: dict[str, Any] = {}

    def slow() -> None:
        started = time.monotonic()
        with pytest.raises(InvalidArgument) as info:
            renderer.check(NESTED, CHAT, special_tokens={})
        outcome["error"], outcome["s"] = info.value, time.monotonic() - started

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert simple(renderer) == [SIMPLE_OUT]
    assert time.monotonic() - started < 0.3
    assert thread.is_alive()  # answered while the runaway template was still running
    thread.join(5)
    error = outcome["error"]
    assert error.field == "chat_template"
    assert "took longer than 1 s" in error.message
    assert 0.9 < outcome["s"] < 1.0 + LIMITS.kill_grace_s


def test_memory_bomb_is_refused_and_its_worker_replaced(renderer: TemplateRenderer) -> None:
    before, peak = set(ready(renderer).worker_pids()), resource.getrusage(resource.RUSAGE_SELF)
    with pytest.raises(InvalidArgument, match="used more than 256 MiB") as info:
        renderer.check("{{ 'x' * 400000000 }}", CHAT, special_tokens={})
    assert info.value.field == "chat_template"
    assert len(before - set(renderer.worker_pids())) == 1  # the one that ran it is gone
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak.ru_maxrss
    assert grown_kib < 100 * 1024  # none of the 400 MB in this process
    assert simple(renderer) == [SIMPLE_OUT]
    assert len(set(ready(renderer).worker_pids()) - before) == 1  # and replaced


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ 1/0 }}", "does not render: ZeroDivisionError: division by zero"),
        ("{{ raise_exception('roles must alternate') }}", "does not render: roles must alternate"),
        ("{% for m in messages %}", "does not render: Unexpected end of template"),
        ("{{ messages[9]['content'] }}", "does not render: "),
    ],
)
def test_a_template_that_fails_is_an_invalid_argument(
    renderer: TemplateRenderer, template: str, message: str
) -> None:
    pids = ready(renderer).worker_pids()
    with pytest.raises(InvalidArgument, match=message) as info:
        renderer.check(template, CHAT, special_tokens={})
    assert info.value.field == "chat_template"
    assert renderer.worker_pids() == pids  # an ordinary error costs no worker


def test_errors_name_the_row(renderer: TemplateRenderer) -> None:
    template = "{% if messages[-1].content == 'bad' %}{{ 1/0 }}{% endif %}ok"
    rows = [[{"role": "user", "content": "fine"}]] * 3 + [[{"role": "user", "content": "bad"}]]
    with pytest.raises(InvalidArgument, match=r"dataset row 13\)") as info:
        renderer.render_prefixes(rows, template, special_tokens={}, first_row=10)
    assert info.value.row == 13


def test_output_over_the_bound_is_refused_in_bytes(renderer: TemplateRenderer) -> None:
    with pytest.raises(InvalidArgument, match="output over 1048576 bytes"):
        renderer.check("{{ 'y' * 1100000 }}", CHAT, special_tokens={})
    with pytest.raises(InvalidArgument, match="output over 1048576 bytes"):
        renderer.check("{{ 'é' * 600000 }}", CHAT, special_tokens={})  # 1.2 MB of UTF-8
    [[text]] = renderer.render_prefixes(
        [CHAT[:1]], "{{ 'é' * 500000 }}", special_tokens={}
    )  # 1 MB: allowed
    assert text == "é" * 500000


def test_should_stop_cancels_a_render_within_half_a_second(renderer: TemplateRenderer) -> None:
    pids = set(ready(renderer).worker_pids())
    started = time.monotonic()
    with pytest.raises(RenderCancelled):
        renderer.render_prefixes(
            [CHAT] * 3,
            NESTED,
            special_tokens={},
            should_stop=lambda: time.monotonic() > started + 0.2,
        )
    assert time.monotonic() - started < 0.7  # well before the 1 s bound
    assert len(pids - set(renderer.worker_pids())) == 1  # killed
    assert simple(renderer) == [SIMPLE_OUT]  # and replaced


def test_a_worker_that_stops_answering_is_killed_after_the_grace(
    renderer: TemplateRenderer,
) -> None:
    """What a render stuck in one long C call looks like from outside: no answer."""
    pids = ready(renderer).worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(InvalidArgument, match="took longer than 1 s"):
            renderer.render_prefixes([CHAT[:1]], SIMPLE, special_tokens={})
        assert time.monotonic() - started < 1.0 + LIMITS.kill_grace_s + 0.3
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert len(set(pids) - set(renderer.worker_pids())) == 1
    assert simple(renderer) == [SIMPLE_OUT]


def test_killed_workers_are_replaced(renderer: TemplateRenderer) -> None:
    for pid in ready(renderer).worker_pids():
        os.kill(pid, signal.SIGKILL)
    assert simple(renderer) == [SIMPLE_OUT]


def test_a_worker_killed_mid_request_is_retried_on_a_fresh_one(
    renderer: TemplateRenderer, caplog: pytest.LogCaptureFixture
) -> None:
    ready(renderer)
    rows = [[{"role": "user", "content": str(i)}] for i in range(200)]
    template = "{% for i in range(20000) %}{% endfor %}{{ messages[0].content }}"
    pids = renderer.worker_pids()
    killer = threading.Timer(0.1, lambda: [os.kill(pid, signal.SIGKILL) for pid in pids])
    killer.start()
    with caplog.at_level(logging.WARNING, logger="tuneserve.data.chat_template"):
        out = renderer.render_prefixes(rows, template, special_tokens={})
    killer.join()
    assert out == [[str(i)] for i in range(200)]
    assert "died" in caplog.text and "attempt 1" in caplog.text


def test_close_kills_workers_and_stops_calls_in_flight() -> None:
    renderer = TemplateRenderer(RenderLimits(workers=1, render_timeout_s=5.0))
    renderer.start(wait=True)
    [pid] = renderer.worker_pids()
    errors: list[BaseException] = []

    def render() -> None:
        try:
            renderer.render_prefixes([CHAT[:1]], NESTED, special_tokens={})
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=render)
    thread.start()
    time.sleep(0.2)
    renderer.close()
    thread.join(2)
    assert not thread.is_alive()
    assert [type(e) for e in errors] == [RendererClosed]
    assert renderer.worker_pids() == []
    assert not _running(pid)
    with pytest.raises(RendererClosed):
        renderer.check(SIMPLE, CHAT, special_tokens={})


def test_workers_do_not_outlive_a_server_that_dies(tmp_path: Path) -> None:
    """The server killed mid-render (no close()): its worker ends within the render bound."""
    script = textwrap.dedent(
        f"""
        import os, threading, time
        from tuneserve.data.chat_template import RenderLimits, TemplateRenderer
        r = TemplateRenderer(RenderLimits(workers=1, render_timeout_s=1.0))
        r.start(wait=True)
        print(r.worker_pids()[0], flush=True)
        threading.Thread(
            target=r.check, args=({NESTED!r}, [{{"role": "user", "content": "x"}}]),
            kwargs={{"special_tokens": {{}}}}, daemon=True,
        ).start()
        time.sleep(0.3)
        os._exit(0)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 3
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it here)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
