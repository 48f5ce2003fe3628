"""tuneserve.data.chat_template: user chat templates rendered as transformers renders them,
in worker processes, under time, output and memory bounds, and cancellable."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
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
# This machine may be busy (CI, a shared 2-core box): a wall-clock bound gets this much room
# beyond what the code promises, and waits for a condition this long before failing.
SLACK_S = 2.0
PATIENCE_S = 30.0


@pytest.fixture(scope="module")
def renderers() -> Iterator[list[TemplateRenderer]]:
    made: list[TemplateRenderer] = []
    yield made
    for r in made:
        r.close()


@pytest.fixture
def renderer(renderers: list[TemplateRenderer]) -> TemplateRenderer:
    """The module's renderer with both workers started: its zygote's start-up (transformers'
    import, seconds on a busy machine) is paid once, unless a test closed it."""
    with contextlib.suppress(IndexError, RendererClosed):
        return ready(renderers[-1])
    renderers.append(TemplateRenderer(LIMITS))
    return ready(renderers[-1])


def ready(renderer: TemplateRenderer) -> TemplateRenderer:
    """Both workers started (an earlier test may have had one replaced)."""
    renderer.start(wait=True)
    return renderer


def simple(renderer: TemplateRenderer) -> list[list[str]]:
    return renderer.render_prefixes([CHAT], SIMPLE, special_tokens={})


def render_in_thread(
    renderer: TemplateRenderer,
) -> tuple[threading.Thread, list[BaseException], threading.Event]:
    """A check of SIMPLE on its own thread: the thread, the errors it raised and the event
    `in_flight` sets once the request is with a worker (or waiting for one)."""
    errors: list[BaseException] = []
    started, should_stop = in_flight()

    def render() -> None:
        try:
            renderer.check(SIMPLE, CHAT, special_tokens={}, should_stop=should_stop)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=render)
    thread.start()
    return thread, errors, started


def in_flight() -> tuple[threading.Event, Callable[[], bool]]:
    """A should_stop that never stops, and an event it sets: the caller asks should_stop
    only while waiting for a worker's answer, so once set, the request is with a worker."""
    event = threading.Event()

    def should_stop() -> bool:
        event.set()
        return False

    return event, should_stop


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
    def expected() -> list[str]:
        return [
            bos_tokenizer.apply_chat_template(CHAT[: i + 1], chat_template=template, tokenize=False)
            for i in range(len(CHAT))
        ]

    before = expected()  # and after: strftime_now's date may change in between
    [prefixes] = renderer.render_prefixes(
        [CHAT], template, special_tokens=special_tokens_of(bos_tokenizer)
    )
    assert prefixes in (before, expected())


def test_nested_loops_time_out_within_the_bound_and_others_still_answer(
    renderer: TemplateRenderer,
) -> None:
    outcome: dict[str, Any] = {}
    rendering, should_stop = in_flight()

    def slow() -> None:
        started = time.monotonic()
        with pytest.raises(InvalidArgument) as info:
            renderer.check(NESTED, CHAT, special_tokens={}, should_stop=should_stop)
        outcome["error"], outcome["s"] = info.value, time.monotonic() - started

    thread = threading.Thread(target=slow)
    thread.start()
    assert rendering.wait(PATIENCE_S)
    assert simple(renderer) == [SIMPLE_OUT]
    assert thread.is_alive()  # answered while the runaway template was still running
    thread.join(PATIENCE_S)
    error = outcome["error"]
    assert error.field == "chat_template"
    # The worker's own 1 s alarm stopped it: the server would have killed it only after
    # check_timeout_s (5 s) plus the grace, saying "took longer than 5 s".
    assert "took longer than 1 s" in error.message
    assert 0.95 < outcome["s"] < 1.0 + SLACK_S


def test_memory_bomb_is_refused_and_its_worker_replaced(renderer: TemplateRenderer) -> None:
    before, peak = set(renderer.worker_pids()), resource.getrusage(resource.RUSAGE_SELF)
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
    pids = renderer.worker_pids()
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


def test_should_stop_cancels_a_render_before_its_time_bound(renderer: TemplateRenderer) -> None:
    pids = set(renderer.worker_pids())
    started = time.monotonic()
    # Cancelled, not InvalidArgument: stopped before the worker's 1 s alarm ended the render
    # (asked every 0.1 s, so ~0.3 s after the start on an idle machine).
    with pytest.raises(RenderCancelled):
        renderer.render_prefixes(
            [CHAT] * 3,
            NESTED,
            special_tokens={},
            should_stop=lambda: time.monotonic() > started + 0.2,
        )
    assert time.monotonic() - started < 0.2 + SLACK_S  # not the 9 s of the request's bound
    assert len(pids - set(renderer.worker_pids())) == 1  # killed
    assert simple(renderer) == [SIMPLE_OUT]  # and replaced


def test_a_worker_that_stops_answering_is_killed_after_the_grace(
    renderer: TemplateRenderer,
) -> None:
    """What a render stuck in one long C call looks like from outside: no answer."""
    pids = renderer.worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(InvalidArgument, match="took longer than 1 s"):
            renderer.render_prefixes([CHAT[:1]], SIMPLE, special_tokens={})
        waited = time.monotonic() - started
        assert 1.0 + LIMITS.kill_grace_s <= waited < 1.0 + LIMITS.kill_grace_s + SLACK_S
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # the one killed may be reaped
                os.kill(pid, signal.SIGCONT)
    assert len(set(pids) - set(renderer.worker_pids())) == 1
    assert simple(renderer) == [SIMPLE_OUT]


def test_killed_workers_are_replaced(renderer: TemplateRenderer) -> None:
    for pid in renderer.worker_pids():
        os.kill(pid, signal.SIGKILL)
    assert simple(renderer) == [SIMPLE_OUT]


def test_a_worker_killed_mid_request_is_retried_on_a_fresh_one(
    renderer: TemplateRenderer, caplog: pytest.LogCaptureFixture
) -> None:
    # One request of 200 renders, 0.3-0.4 s of a worker's CPU here: the workers are killed
    # once one has used 30 ms of CPU since the call, so mid-request however busy the machine
    # is (CPU time, not wall time) and on one a few times faster.
    rows = [[{"role": "user", "content": str(i)}] for i in range(200)]
    template = "{% for i in range(30000) %}{% endfor %}{{ messages[0].content }}"
    pids = renderer.worker_pids()
    cpu = {pid: _cpu_s(pid) for pid in pids}

    def kill_mid_request() -> None:
        deadline = time.monotonic() + PATIENCE_S
        while all(_cpu_s(pid) < cpu[pid] + 0.03 for pid in pids):
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_request)
    killer.start()
    with caplog.at_level(logging.WARNING, logger="tuneserve.data.chat_template"):
        out = renderer.render_prefixes(rows, template, special_tokens={})
    killer.join()
    assert out == [[str(i)] for i in range(200)]
    assert "died" in caplog.text and "attempt 1" in caplog.text


def test_close_kills_workers_and_stops_calls_in_flight(renderer: TemplateRenderer) -> None:
    """The module's renderer, closed: the last test to use it (a later one gets a new one)."""
    pids = renderer.worker_pids()
    [zygote] = {_parent(pid) for pid in pids}
    # Stopped workers: the call stays in flight (till check_timeout_s, 5 s) however long
    # this busy machine takes to get to close(), and SIGKILL must still end them.
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    thread, errors, rendering = render_in_thread(renderer)
    assert rendering.wait(PATIENCE_S)
    renderer.close()
    # Gone when close() returns, the busy worker, the idle one and the zygote: the server's
    # shutdown relies on it.
    assert [pid for pid in [*pids, zygote] if _running(pid)] == []
    assert renderer.worker_pids() == []
    thread.join(PATIENCE_S)
    assert not thread.is_alive()
    assert [type(e) for e in errors] == [RendererClosed]
    with pytest.raises(RendererClosed):
        renderer.check(SIMPLE, CHAT, special_tokens={})
    renderer.close()  # idempotent


def test_close_while_the_zygote_starts_stops_it_and_its_waiting_callers() -> None:
    before = _zygotes()
    renderer = TemplateRenderer(RenderLimits(workers=1))
    # Asked while waiting for the zygote's imports.
    thread, errors, waiting = render_in_thread(renderer)
    assert waiting.wait(PATIENCE_S)
    [zygote] = _zygotes() - before
    renderer.close()
    assert not _running(zygote)
    thread.join(PATIENCE_S)
    assert not thread.is_alive()
    assert [type(e) for e in errors] == [RendererClosed]
    assert _zygotes() == before


def test_workers_do_not_outlive_a_server_that_dies(tmp_path: Path) -> None:
    """The server killed mid-render (no close()): its worker ends soon after the render
    bound, and the idle zygote at once."""
    script = textwrap.dedent(
        f"""
        import os, threading
        from tuneserve.data.chat_template import RenderLimits, TemplateRenderer
        r = TemplateRenderer(RenderLimits(workers=1, render_timeout_s=0.5))
        r.start(wait=True)
        [worker] = r.worker_pids()
        with open(f"/proc/{{worker}}/stat") as f:
            zygote = f.read().rpartition(")")[2].split()[1]
        print(worker, zygote, flush=True)
        rendering = threading.Event()
        threading.Thread(
            target=r.check, args=({NESTED!r}, [{{"role": "user", "content": "x"}}]),
            kwargs={{"special_tokens": {{}}, "should_stop": lambda: rendering.set()}},
            daemon=True,
        ).start()
        os._exit(0 if rendering.wait({PATIENCE_S}) else 3)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    pids = [int(pid) for pid in proc.stdout.split()]
    deadline = time.monotonic() + 0.5 + SLACK_S
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [pid for pid in pids if _running(pid)] == []


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); [] once reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return []


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it here)."""
    return _stat(pid)[:1] not in ([], ["Z"])


def _parent(pid: int) -> int:
    return int(_stat(pid)[1])


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds the process has used; 0 once gone."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def _zygotes() -> set[int]:
    """This process's running children that are chat template zygotes."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _stat(int(entry.name))[1:2] == [str(os.getpid())]:
            with contextlib.suppress(OSError):
                if b"chat_template_worker.py" in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
    return {pid for pid in found if _running(pid)}
