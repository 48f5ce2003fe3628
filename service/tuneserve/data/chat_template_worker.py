"""Chat-template worker processes: render user-supplied Jinja chat templates exactly as
transformers does, inside bounds the server cannot enforce on its own threads.

`tuneserve.data.chat_template` runs this file (by path, not `-m`, so nothing of tuneserve
or torch is imported here) as a *zygote*: `python chat_template_worker.py FD BUDGET`, where
FD is a UNIX socket to the server. The zygote imports transformers once (1-3 s, most of a
worker's start-up) and then forks a worker per `{"spawn": true}` line, answering
`{"pid": ...}` with the worker's socket and a pidfd attached (SCM_RIGHTS), so a worker
costs milliseconds to start or replace and the server can kill it without racing pid reuse.
Forking is safe here: this process has one thread and no torch.

A worker speaks JSON lines on its socket:
- request: `{"template", "conversations", "variables", "render_s", "total_s", "max_bytes"}`;
- reply: one line per conversation, in order, `{"ok": [text, ...]}` (the renderings of every
  prefix of the conversation), or `{"error": kind, "message": ...}`, after which the rest of
  the request is skipped. Kinds: render, time, size, memory.

Bounds, and why each is enforced here rather than by the server alone:
- time: SIGALRM (setitimer) interrupts the Python bytecode Jinja compiles to, so a runaway
  loop becomes a clean "took longer than" reply and the worker lives on; RLIMIT_CPU is a
  kernel backstop that ends the process even inside one long C call, with or without a
  server (which also kills it after a grace);
- memory: RLIMIT_AS at the worker's size after start-up plus BUDGET, so `'x' * 400000000`
  fails with MemoryError here instead of growing the server; the worker then exits, since
  nothing it holds can be trusted afterwards;
- output: the rendered text's UTF-8 size is checked before it is sent.

Zygote and workers exit when their socket closes, so they never outlive the server: a dead
server's sockets close, and a render in progress is stopped by the time bound first. (Not
PR_SET_PDEATHSIG: it fires when the *thread* that started the child ends.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import socket
import sys
import time
import traceback
from typing import Any, BinaryIO

# Run by path: drop this file's directory from the import path, where rows.py and friends
# would shadow nothing today but must never be imported by accident.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import transformers.utils.chat_template_utils as ctu


class _TimeUp(BaseException):  # BaseException: no `except Exception` on the way may eat it
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _TimeUp


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _render(template: str, messages: list[dict[str, Any]], variables: dict[str, Any]) -> str:
    """`tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)`,
    with the tokenizer's special tokens in `variables` (as apply_chat_template passes them)."""
    # As apply_chat_template normalises messages: keys whose value is None are dropped.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    # Annotated `-> str`, it returns (renderings, generation indices).
    result: Any = ctu.render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=False,
        **variables,
    )
    return str(result[0][0])


def _describe(e: BaseException) -> str:
    import jinja2

    if isinstance(e, jinja2.TemplateError):  # raise_exception() and syntax errors read as is
        return str(e) or type(e).__name__
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _serve_request(request: dict[str, Any], out: BinaryIO) -> bool:
    """Answer one request; False when the worker must exit (after a MemoryError)."""
    template: str = request["template"]
    variables: dict[str, Any] = request["variables"]
    render_s: float = request["render_s"]
    max_bytes: int = request["max_bytes"]
    conversations: list[list[dict[str, Any]]] = request["conversations"]
    renders = sum(len(c) for c in conversations)
    total_s: float = request.get("total_s") or renders * render_s
    # The kernel's backstop: CPU seconds for this request, whole seconds, plus slack.
    used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    cpu_limit = math.ceil(used + min(total_s, renders * render_s) + 2)
    if hard != resource.RLIM_INFINITY:
        cpu_limit = min(cpu_limit, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, hard))
    deadline = time.monotonic() + total_s

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
        out.flush()

    for messages in conversations:
        texts: list[str] = []
        for end in range(1, len(messages) + 1):
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise _TimeUp
                signal.setitimer(signal.ITIMER_REAL, min(render_s, left))
                try:
                    text = _render(template, messages[:end], variables)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _TimeUp:
                bound = f"{total_s:g} s in all" if left < render_s else f"{render_s:g} s"
                reply({"error": "time", "message": f"took longer than {bound}"})
                return True
            except MemoryError:
                reply({"error": "memory", "message": "used more than the memory limit"})
                return False
            except Exception as e:
                reply({"error": "render", "message": _describe(e)})
                return True
            size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
            if size > max_bytes:
                reply({"error": "size", "message": f"output over {max_bytes} bytes"})
                return True
            texts.append(text)
        reply({"ok": texts})
    return True


def _work(sock: socket.socket, budget: int) -> None:
    """A worker's life: limits set, then requests until the socket closes."""
    signal.signal(signal.SIGALRM, _alarm)
    limit = _vm_bytes() + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    reader, writer = sock.makefile("rb"), sock.makefile("wb")
    last_template = None
    while line := reader.readline():  # EOF: the server is gone or let this worker go
        try:
            request = json.loads(line)
            if request["template"] != last_template:
                # Compiled templates are cached; a long-lived worker keeps only the current
                # one, or a stream of distinct large templates would fill its memory budget.
                ctu._compile_jinja_template.cache_clear()
                last_template = request["template"]
            if not _serve_request(request, writer):
                return
        except MemoryError:  # outside a render (reading the request, writing a reply)
            writer.write(b'{"error": "memory", "message": "used more than the memory limit"}\n')
            writer.flush()
            return


def _reap(signum: int, frame: Any) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _fork_worker(control: socket.socket, reader: BinaryIO, budget: int) -> None:
    ours, theirs = socket.socketpair()
    # SIGCHLD held until the pidfd is open: a worker that died at once must not be reaped,
    # and its pid reused, before the pidfd names it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                reader.close()  # the zygote's end of the server's socket is not the worker's
                control.close()
                ours.close()
                _work(theirs, budget)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server let it go
            except BaseException:
                code = 1
                traceback.print_exc()
            finally:
                os._exit(code)
        fds = [ours.fileno()]
        pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else -1
        if pidfd >= 0:
            fds.append(pidfd)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    theirs.close()
    try:
        socket.send_fds(control, [json.dumps({"pid": pid}).encode() + b"\n"], fds)
    finally:
        ours.close()
        if pidfd >= 0:
            os.close(pidfd)


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    budget = int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the server
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU must not write a core file
    # Warm up (Jinja's compiler and the template machinery) once, for every worker.
    _render("{{ messages[0]['content'] }}", [{"role": "user", "content": "x"}], {})
    signal.signal(signal.SIGCHLD, _reap)
    ready = {"ready": True, "pid": os.getpid(), "vm_bytes": _vm_bytes()}
    control.sendall(json.dumps(ready).encode() + b"\n")
    reader = control.makefile("rb")
    while line := reader.readline():  # EOF: the server is gone or closed the renderer
        if json.loads(line).get("spawn"):
            _fork_worker(control, reader, budget)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        main()
