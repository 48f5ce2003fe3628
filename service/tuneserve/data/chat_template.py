"""User-supplied chat templates, rendered exactly as transformers renders them, but in a
small pool of worker processes under a time, output-size and memory bound, and cancellable.

Why not on the server's threads: a chat template is a program. Rendered in-process, nested
`range(90000)` loops held a shared thread (and the GIL) for seconds, `'x' * 400000000`
took 1.5 GB, and neither could be stopped by CancelJob or SIGTERM. Here each render runs in
a worker process (chat_template_worker.py: forked from a zygote, a plain `python` that
imported transformers once, never from the torch-laden server) that:

- renders with transformers' own `render_jinja_template` and the tokenizer's special tokens,
  as `tokenizer.apply_chat_template(..., tokenize=False)` does, so `{% generation %}`,
  `strftime_now`, `raise_exception` and loop controls work as transformers has them;
- stops a render after `render_timeout_s` (SIGALRM in the worker; the server kills it
  `kill_grace_s` later if it has not answered, and RLIMIT_CPU ends it if both fail);
- refuses output over `max_output_bytes` and may allocate `max_memory_bytes` (RLIMIT_AS),
  so a memory bomb fails there, not here;
- is killed when `should_stop()` says so (CancelJob, shutdown), and replaced;
- exits when its socket closes, so it never outlives the server; `close()` (shutdown) kills
  the zygote and every worker and returns once they have exited.

Every failure the template causes is an InvalidArgument(field="chat_template"), naming the
dataset row when there is one. Start-up is the zygote's import of transformers (1-3 s);
`start()` at server start takes it off every call's path, and a worker is then forked or
replaced in milliseconds. A render costs about 0.2-0.4 ms more than in-process (JSON over a
socket), batched so a dataset is a few large requests rather than many small ones.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneserve.errors import Cancelled, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, Any]]
WORKER = Path(__file__).with_name("chat_template_worker.py")
_POLL_S = 0.1  # how often a waiting caller asks should_stop
_REQUEST_CHARS = 1 << 20  # a request carries about this much conversation text at most
# A SIGKILLed process exits in milliseconds; on a loaded machine, in well under a second. This
# bounds the wait for it (release, close) should one be stuck in the kernel (D state).
_EXIT_WAIT_S = 5.0


def _never() -> bool:
    return False


@dataclass(frozen=True, kw_only=True)
class RenderLimits:
    render_timeout_s: float = 2.0
    """One rendering of one conversation (or prefix of one) may take this long."""
    check_timeout_s: float = 5.0
    """`check` renders every prefix of one conversation; all of them together, this long."""
    max_output_bytes: int = 1 << 20
    """One rendering may be this many bytes of UTF-8 at most."""
    max_memory_bytes: int = 256 << 20
    """Address space (RLIMIT_AS) a worker may add to its size after start-up (~130 MiB of
    Python and transformers, shared with the zygote): what one render may allocate."""
    workers: int = 2
    """Worker processes at most; callers beyond that wait for one to be free."""
    kill_grace_s: float = 1.0
    """Past its time bound, a worker that has not answered is killed this much later."""
    start_timeout_s: float = 60.0
    """A new worker that is not ready (imports done) after this long is a server fault."""
    renders_per_request: int = 256
    """Renders sent to a worker in one request: large enough that a request's overhead is
    small, small enough that a long dataset is many modest messages and others get a turn."""

    def validate(self) -> RenderLimits:
        for name in ("render_timeout_s", "check_timeout_s", "kill_grace_s", "start_timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name}: must be positive", field=name)
        for name in ("max_output_bytes", "workers", "renders_per_request"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name}: must be at least 1", field=name)
        if self.max_memory_bytes < 16 << 20:
            raise InvalidArgument("max_memory_bytes: at least 16 MiB", field="max_memory_bytes")
        return self


class RenderCancelled(Cancelled):
    """`should_stop` said to stop while a render was under way; the worker was killed."""


class RendererClosed(Unavailable):
    """The renderer was closed (the server is shutting down) before or during the call."""


class _Overdue(Exception):
    pass


class _Died(Exception):
    pass


class _Channel:
    """JSON lines over a UNIX socket, each read bounded by a deadline and a stop check.
    One thread uses a channel at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._poll = select.poll()  # not select(): the server may hold fds past FD_SETSIZE
        self._poll.register(sock.fileno(), select.POLLIN)
        self._buf = bytearray()
        self.fds: list[int] = []  # passed along with the last messages read (SCM_RIGHTS)

    def send(self, message: dict[str, Any], *, timeout: float) -> None:
        data = json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass")
        self.sock.settimeout(timeout)  # a worker that stopped reading must not hold us
        try:
            self.sock.sendall(data + b"\n")
        except TimeoutError:
            raise _Overdue from None
        except OSError:  # the other end is gone (EPIPE, ECONNRESET, EBADF)
            raise _Died from None

    def read(self, deadline: float, should_stop: Callable[[], bool]) -> dict[str, Any] | None:
        """The next message, or None at EOF (the process died). Raises _Overdue past
        `deadline` and RenderCancelled when `should_stop()`, asked every _POLL_S."""
        scanned, asked = 0, time.monotonic()
        while (newline := self._buf.find(b"\n", scanned)) < 0:
            scanned = len(self._buf)
            now = time.monotonic()
            if now >= deadline:
                raise _Overdue
            if now - asked >= _POLL_S:
                if should_stop():
                    raise RenderCancelled("stopped while rendering the chat template")
                asked = time.monotonic()
            if self._poll.poll(max(1, int(1000 * min(_POLL_S, deadline - now)))):
                try:
                    chunk, fds, _, _ = socket.recv_fds(
                        self.sock, 1 << 20, 2, socket.MSG_CMSG_CLOEXEC
                    )
                except OSError:
                    return None
                self.fds += fds
                if not chunk:
                    return None
                self._buf += chunk
        line = bytes(self._buf[:newline])
        del self._buf[: newline + 1]
        return dict(json.loads(line.decode("utf-8", "surrogatepass")))

    def quiet(self) -> bool:
        """Nothing to read and not closed: what an idle worker that is alive looks like."""
        return not self._buf and not self._poll.poll(0)

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class _Worker:
    """A worker process (a child of the zygote) and its channel. One thread uses it at a
    time (the pool hands it out), but `kill` and `exit_watch` may come from any thread."""

    def __init__(self, sock: socket.socket, *, pid: int, pidfd: int) -> None:
        self.channel, self.pid, self._pidfd = _Channel(sock), pid, pidfd
        self._lock = threading.Lock()  # kill() against release(): never signal a closed fd

    def kill(self) -> None:
        """SIGKILL, without waiting; never raises (the process may be gone already)."""
        with self._lock, contextlib.suppress(OSError):  # ProcessLookupError among them
            if self._pidfd >= 0:  # a pidfd names this process, never one that reused its pid
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            elif self._pidfd == -1:
                os.kill(self.pid, signal.SIGKILL)

    def exit_watch(self) -> _ExitWatch:
        """What `_wait_exited` needs to wait for this process, valid after `release`."""
        with self._lock:
            pidfd = os.dup(self._pidfd) if self._pidfd >= 0 else -1
        return _ExitWatch(pid=self.pid, pidfd=pidfd)

    def release(self, deadline: float | None = None) -> None:
        """Kill it, wait until it has exited (till `deadline`, else _EXIT_WAIT_S from now),
        and close what refers to it; by the thread that holds it. Waiting costs milliseconds
        and means no killed worker still runs, or holds memory, once this returns."""
        self.kill()
        if deadline is None:
            deadline = time.monotonic() + _EXIT_WAIT_S
        _wait_exited([self.exit_watch()], deadline)
        with self._lock:
            if self._pidfd >= 0:
                os.close(self._pidfd)
            self._pidfd = -2
        self.channel.close()


@dataclass(frozen=True)
class _ExitWatch:
    pid: int
    pidfd: int  # our own duplicate (closed by _wait_exited), or -1: no pidfd on this system


def _wait_exited(watches: Sequence[_ExitWatch], deadline: float) -> bool:
    """Until every process has exited (a zombie has: it runs nothing and holds no memory or
    fds) or `deadline`; True if all did. Closes the watches' pidfds."""
    poll = select.poll()
    pending = {w.pidfd for w in watches if w.pidfd >= 0}
    for fd in pending:
        poll.register(fd, select.POLLIN)  # a pidfd reads as ready once its process exited
    try:
        while pending and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poll.poll(max(1, int(1000 * left))):
                poll.unregister(fd)
                pending.discard(fd)
    finally:
        for w in watches:
            if w.pidfd >= 0:
                os.close(w.pidfd)
    # Without pidfds (Linux < 5.3), by pid: a reused pid can only make this wait longer.
    without = [w.pid for w in watches if w.pidfd < 0]
    while without and time.monotonic() < deadline:
        without = [pid for pid in without if _running(pid)]
        if without:
            time.sleep(0.01)
    return not pending and not without


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class _Zygote:
    """The process that imports transformers once and forks workers on request (see
    chat_template_worker.py). Its start-up (1-3 s) is the only slow one; a worker then
    costs milliseconds. One thread at a time (the renderer's spawn lock)."""

    def __init__(self, limits: RenderLimits) -> None:
        env = {
            **os.environ,
            # One thread, so forking is safe and numpy's BLAS pool reserves no memory.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_OFFLINE": "1",
        }
        ours, theirs = socket.socketpair()
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), str(theirs.fileno()), str(limits.max_memory_bytes)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        finally:
            theirs.close()
        self.channel = _Channel(ours)
        self.ready = False

    def spawn(self, limits: RenderLimits, should_stop: Callable[[], bool]) -> _Worker:
        """A new worker; RuntimeError if the zygote is gone or never started."""
        try:
            if not self.ready:
                hello = self.channel.read(self.started + limits.start_timeout_s, should_stop)
                if hello is None or not hello.get("ready"):
                    raise _Died
                self.ready = True
                log.info(
                    "chat template zygote %d ready in %.2fs (%d MiB)",
                    self.proc.pid,
                    time.monotonic() - self.started,
                    hello["vm_bytes"] >> 20,
                )
            started = time.monotonic()
            self.channel.send({"spawn": True}, timeout=limits.start_timeout_s)
            reply = self.channel.read(started + limits.start_timeout_s, _never)
            fds, self.channel.fds = self.channel.fds, []
            if reply is None or not fds:
                for fd in fds:
                    os.close(fd)
                raise _Died
        except (_Died, _Overdue):
            raise RuntimeError(
                f"the chat template zygote {self.proc.pid} did not start or died "
                f"(exit code {self.proc.poll()}); see the server's stderr"
            ) from None
        sock = socket.socket(fileno=fds[0])
        log.debug("chat template worker %d forked in %.1f ms", reply["pid"], _ms(started))
        return _Worker(sock, pid=int(reply["pid"]), pidfd=fds[1] if len(fds) > 1 else -1)

    def kill(self, deadline: float | None = None) -> None:
        """SIGKILL, and reap it (waiting till `deadline`, else _EXIT_WAIT_S from now). Safe
        from any thread; the channel is closed by `close`."""
        with contextlib.suppress(OSError):  # Popen.kill: nothing once it has been reaped
            self.proc.kill()
        left = _EXIT_WAIT_S if deadline is None else deadline - time.monotonic()
        try:
            self.proc.wait(max(left, 0.01))
        except subprocess.TimeoutExpired:
            log.error("chat template zygote %d did not exit after SIGKILL", self.proc.pid)

    def close(self, deadline: float | None = None) -> None:
        self.kill(deadline)
        self.channel.close()


def _ms(since: float) -> float:
    return 1000 * (time.monotonic() - since)


class TemplateRenderer:
    """A pool of chat-template workers. Thread-safe: every public method may be called from
    any thread, concurrently; `workers` renders run at once, later callers wait."""

    def __init__(self, limits: RenderLimits | None = None) -> None:
        self.limits = (limits or RenderLimits()).validate()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()  # idle and busy
        self._spawning = 0  # workers being forked: they count against `workers`
        self._closed = False
        self._spawn_lock = threading.Lock()  # the zygote's channel: one thread at a time
        self._zygote: _Zygote | None = None

    # --- lifecycle

    def start(self, *, wait: bool = False) -> None:
        """Start the zygote now (1-3 s, in the background), so no call waits for it; with
        `wait`, until it is ready and `workers` workers are forked. Any time, any thread."""
        with self._cond:
            if self._closed:
                raise RendererClosed("the chat template renderer is closed")
        if self._spawn_lock.acquire(timeout=self.limits.start_timeout_s):
            try:
                if self._zygote is None or self._zygote.proc.poll() is not None:
                    self._new_zygote()
            finally:
                self._spawn_lock.release()
        if wait:
            workers: list[_Worker] = []
            try:
                while len(workers) < self.limits.workers:
                    workers.append(self._checkout(_never))
            finally:
                for worker in workers:
                    self._checkin(worker, healthy=True)

    def close(self) -> None:
        """Kill the zygote and every worker, busy ones too (their callers get
        RendererClosed), and return once they have exited (a few seconds at most, should
        one be stuck in the kernel): the server's shutdown relies on no worker outliving
        it. Idempotent; any thread."""
        with self._cond:
            self._closed = True
            # A worker is released (its pidfd closed) only after it has left `_live`, so
            # each one here can still be watched, whichever thread releases it.
            workers = list(self._live)
            watches = [w.exit_watch() for w in workers]
            idle, self._idle, self._live = self._idle, [], set()
            zygote = self._zygote  # a later one is closed by whoever starts it (_new_zygote)
            self._cond.notify_all()
        deadline = time.monotonic() + _EXIT_WAIT_S
        for worker in workers:  # busy ones' callers see EOF, and release them
            worker.kill()
        # Workers first, while the zygote lives to reap them (no zombies left to init).
        if not _wait_exited(watches, deadline):
            log.error("chat template workers still running %gs after SIGKILL", _EXIT_WAIT_S)
        for worker in idle:
            worker.release(deadline)
        if zygote is not None:
            zygote.kill(deadline)
            # A spawn under way ends now that its zygote is gone (EOF), and releases what
            # it forked before giving back its slot.
            if self._spawn_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                zygote.channel.close()
                self._spawn_lock.release()
        with self._cond:
            self._cond.wait_for(
                lambda: self._spawning == 0, timeout=max(0.0, deadline - time.monotonic())
            )

    def __enter__(self) -> TemplateRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        """The live workers' process ids (for diagnostics and tests)."""
        with self._cond:
            return sorted(w.pid for w in self._live)

    # --- rendering

    def check(
        self,
        template: str,
        messages: Messages,
        *,
        special_tokens: Mapping[str, str],
        should_stop: Callable[[], bool] = _never,
    ) -> None:
        """Raise InvalidArgument(field="chat_template") unless `template` renders every
        prefix of `messages` (as training will) within the bounds, `check_timeout_s` for
        all of them together. Thread-safe."""
        self._request(
            [messages],
            template,
            special_tokens=special_tokens,
            should_stop=should_stop,
            total_s=self.limits.check_timeout_s,
            first_row=None,
        )

    def render_prefixes(
        self,
        conversations: Sequence[Messages],
        template: str,
        *,
        special_tokens: Mapping[str, str],
        should_stop: Callable[[], bool] = _never,
        first_row: int = 0,
    ) -> list[list[str]]:
        """For each conversation, its renderings `messages[:1]`, `messages[:2]`, ... as
        `tokenizer.apply_chat_template(prefix, chat_template=template, tokenize=False)`
        gives them. Each render is bounded by `render_timeout_s`, so a request of n renders
        by n times that. A failure raises InvalidArgument naming its row (`first_row` plus
        the conversation's index); `should_stop()` raises RenderCancelled within ~0.1 s.
        Thread-safe."""
        out: list[list[str]] = []
        for start, stop in self._batches(conversations):
            out += self._request(
                conversations[start:stop],
                template,
                special_tokens=special_tokens,
                should_stop=should_stop,
                total_s=None,
                first_row=first_row + start,
            )
        return out

    def _batches(self, conversations: Sequence[Messages]) -> list[tuple[int, int]]:
        batches, start, renders, chars = [], 0, 0, 0
        for i, messages in enumerate(conversations):
            size = sum(len(str(m.get("content", ""))) for m in messages)
            if i > start and (
                renders + len(messages) > self.limits.renders_per_request
                or chars + size > _REQUEST_CHARS
            ):
                batches.append((start, i))
                start, renders, chars = i, 0, 0
            renders, chars = renders + len(messages), chars + size
        if start < len(conversations):
            batches.append((start, len(conversations)))
        return batches

    def _request(
        self,
        conversations: Sequence[Messages],
        template: str,
        *,
        special_tokens: Mapping[str, str],
        should_stop: Callable[[], bool],
        total_s: float | None,
        first_row: int | None,
    ) -> list[list[str]]:
        limits = self.limits
        renders = sum(len(c) for c in conversations)
        bound = renders * limits.render_timeout_s if total_s is None else total_s
        request = {
            "template": template,
            "conversations": [[dict(m) for m in c] for c in conversations],
            "variables": dict(special_tokens),
            "render_s": limits.render_timeout_s,
            "total_s": total_s,
            "max_bytes": limits.max_output_bytes,
        }

        def row(index: int) -> int | None:
            return None if first_row is None else first_row + index

        # A worker that dies under a request is retried once on a fresh one: it may have
        # been killed from outside. Twice, and the template is the likelier cause.
        for attempt in (1, 2):
            worker = self._checkout(should_stop, fresh=attempt > 1)
            healthy, index = False, 0
            try:
                deadline = time.monotonic() + bound + limits.kill_grace_s
                worker.channel.send(request, timeout=bound + limits.kill_grace_s)
                out = []
                for index in range(len(conversations)):
                    reply = worker.channel.read(deadline, should_stop)
                    if reply is None:
                        raise _Died
                    if "error" in reply:
                        healthy = reply["error"] != "memory"  # it exits after a MemoryError
                        raise self._invalid(reply["error"], reply["message"], row(index))
                    out.append([str(t) for t in reply["ok"]])
                healthy = True
                return out
            except _Overdue:  # the worker's own alarm did not stop it: killed
                message = f"took longer than {bound:g} s"
                raise self._invalid("time", message, row(index)) from None
            except _Died:
                if self._is_closed():
                    raise RendererClosed("the chat template renderer was closed") from None
                log.warning("chat template worker %d died on attempt %d", worker.pid, attempt)
            finally:
                self._checkin(worker, healthy)
        message = "the renderer process died rendering it"
        raise self._invalid("died", message, row(index))

    def _invalid(self, kind: str, message: str, row: int | None) -> InvalidArgument:
        if kind == "memory":
            message = f"used more than {self.limits.max_memory_bytes >> 20} MiB"
        elif kind == "render":
            message = f"does not render: {message}"
        where = "" if row is None else f" (dataset row {row})"
        return InvalidArgument(f"chat_template: {message}{where}", field="chat_template", row=row)

    # --- the pool

    def _checkout(self, should_stop: Callable[[], bool], *, fresh: bool = False) -> _Worker:
        """An idle worker, else a new one if fewer than `workers` live, else wait. `fresh`:
        a new one, in place of an idle one if need be (after a worker died, its idle peers
        may be dying of the same cause, not yet visibly)."""
        while True:
            spawn, worker = False, None
            with self._cond:
                if self._closed:
                    raise RendererClosed("the chat template renderer is closed")
                dead = [w for w in self._idle if not w.channel.quiet()]  # killed while idle
                room = len(self._live) - len(dead) + self._spawning < self.limits.workers
                if fresh and self._idle and not room:
                    dead.append(self._idle[0])
                for gone in dead:
                    self._idle.remove(gone)
                    self._live.discard(gone)
                if self._idle and not fresh:
                    worker = self._idle.pop()
                elif len(self._live) + self._spawning < self.limits.workers:
                    self._spawning += 1
                    spawn = True
                else:
                    self._cond.wait(_POLL_S)
            for gone in dead:
                gone.release()
            if worker is not None:
                return worker
            if spawn:
                return self._spawn(should_stop)
            if should_stop():
                raise RenderCancelled("stopped while waiting for a chat template worker")

    def _spawn(self, should_stop: Callable[[], bool]) -> _Worker:
        """Fork a worker from the zygote (starting the zygote first if it is not running);
        its slot in `_spawning` was taken by the caller."""
        worker = None
        try:
            while not self._spawn_lock.acquire(timeout=_POLL_S):
                if should_stop():
                    raise RenderCancelled("stopped while waiting for a chat template worker")
                if self._is_closed():
                    raise RendererClosed("the chat template renderer is closed")
            try:
                for attempt in (1, 2):
                    zygote = self._zygote
                    if zygote is None or zygote.proc.poll() is not None:
                        zygote = self._new_zygote()
                    try:
                        worker = zygote.spawn(self.limits, should_stop)
                        break
                    except RuntimeError:
                        zygote.close()
                        self._zygote = None
                        if self._is_closed():
                            raise RendererClosed("the chat template renderer was closed") from None
                        if attempt == 2:
                            raise
                        log.warning("chat template zygote %d died; restarting", zygote.proc.pid)
            finally:
                if self._is_closed() and self._zygote is not None:
                    self._zygote.close()
                self._spawn_lock.release()
        finally:
            with self._cond:
                closed = self._closed
                if worker is not None and not closed:
                    self._live.add(worker)
            if closed and worker is not None:
                worker.release()  # before the slot is given back: close() waits for that
            with self._cond:
                self._spawning -= 1
                self._cond.notify_all()
        assert worker is not None
        if closed:
            raise RendererClosed("the chat template renderer is closed")
        return worker

    def _new_zygote(self) -> _Zygote:  # with the spawn lock held
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None
        zygote = _Zygote(self.limits)
        with self._cond:  # against close(): it kills the zygote it sees, we the one it missed
            closed = self._closed
            if not closed:
                self._zygote = zygote
        if closed:
            zygote.close()
            raise RendererClosed("the chat template renderer is closed")
        return zygote

    def _is_closed(self) -> bool:
        with self._cond:
            return self._closed

    def _checkin(self, worker: _Worker, healthy: bool) -> None:
        """Back to the pool, or killed (and replaced by the next checkout, in milliseconds)."""
        with self._cond:
            keep = healthy and not self._closed and worker.channel.quiet()
            if keep:
                self._idle.append(worker)
            else:
                self._live.discard(worker)
            self._cond.notify()
        if not keep:
            worker.release()


_shared: TemplateRenderer | None = None
_shared_lock = threading.Lock()


def shared_renderer() -> TemplateRenderer:
    """The process's renderer: the one `set_shared_renderer` installed, else one with the
    default limits, made on first use and closed at exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = TemplateRenderer()
            atexit.register(_shared.close)
        return _shared


def set_shared_renderer(renderer: TemplateRenderer) -> None:
    """Install the server's renderer (configured limits) as the process's; the caller closes
    it at shutdown."""
    global _shared
    with _shared_lock:
        _shared = renderer


def special_tokens_of(tokenizer: Any) -> dict[str, str]:
    """The variables apply_chat_template gives a template besides the messages: the
    tokenizer's named special tokens (bos_token, eos_token, ...)."""
    return {str(k): str(v) for k, v in dict(tokenizer.special_tokens_map).items()}
