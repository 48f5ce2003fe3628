"""Adapter-aware routing over many tuneserve replicas.

Every replica answers every call (jobs and adapters live in the shared store), but a replica
must pull and load an adapter's weights before it can generate with it, so the requests for
one adapter should go to the few replicas that already hold it. The policy:

- **Rank.** The replicas are ranked for each adapter by rendezvous (highest-random-weight)
  hashing: the score of (adapter, replica) is the first 8 bytes of SHA-256 over
  `f"{adapter_id}\\n{address}"`, an unsigned big-endian integer; highest first, ties by
  address. The Node.js client (`clients/node/tuneserve.js`, `rankReplicas`) computes the same
  order, so both clients send an adapter to the same replicas. Adding or removing a replica
  moves only the adapters that rank it among their homes (about 1/N of them).
- **Home.** An adapter's home is the first `replicas_per_adapter` (default 2) replicas of its
  rank that are up. A request goes to the home replica where this client has the fewest calls
  in flight (ties: the higher ranked, so at low load an adapter stays on one replica).
- **Spill.** When every home replica has `max_in_flight_per_replica` (default 8) or more
  calls in flight, the request goes to the next replica in rank order with room: load
  spreads in a fixed order that is the adapter's own, not "wherever it is loaded" (which
  makes hotspots). When no replica has room, the least loaded one takes it.
- **Down.** A replica that answered UNAVAILABLE (or whose channel failed) is skipped for
  `cooldown_s` (default 5 s); its adapters go to the next replica in their rank meanwhile.
  When every replica is down they are all tried anyway.
- **Everything else.** Base-model requests (adapter_id "") and calls that need no adapter
  (TrainJob, GetStatus, ListJobs, ListAdapters, CancelJob, DeleteAdapter, ...) go to the
  least loaded replica, ties taken in turn (round-robin).

Replicas come from a static list ("host1:50051,host2:50051") or from a DNS name that
resolves to several addresses, such as a Kubernetes headless Service
("dns:///tuneserve-serve-headless.tuneserve.svc:50051"), resolved again every
`resolve_interval_s` (default 30 s); channels to replicas that stay are kept.

`Router` is the policy alone (no I/O, thread-safe); `RoutedClient` is a client with
TuneserveClient's methods that keeps one TuneserveClient per replica and asks its router
where each call goes. A call that fails with UNAVAILABLE or RESOURCE_EXHAUSTED is tried at
once on the next replica the router picks; only when every replica has been tried does the
client wait, by its RetryPolicy's backoff, before the next round.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from tuneserve_client.client import DEFAULT, Timeout, TuneserveClient, poll_job
from tuneserve_client.errors import ClientError
from tuneserve_client.retry import RetryPolicy
from tuneserve_client.v1 import tuneserve_pb2 as pb

__all__ = [
    "NoReplicaError",
    "RoutedClient",
    "Router",
    "RoutingPolicy",
    "parse_target",
    "rank_replicas",
    "resolve_dns",
    "score",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

Resolver = Callable[[str, int], list[str]]
"""`resolver(host, port)` -> the replicas' addresses ("ip:port")."""


def score(adapter_id: str, address: str) -> int:
    """The rendezvous weight of one (adapter, replica) pair: the first 8 bytes of SHA-256 over
    `f"{adapter_id}\\n{address}"` (UTF-8) as an unsigned big-endian integer."""
    digest = hashlib.sha256(f"{adapter_id}\n{address}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rank_replicas(adapter_id: str, addresses: Iterable[str]) -> list[str]:
    """Every address, best first for `adapter_id`: highest weight first, ties by address."""
    return sorted(set(addresses), key=lambda a: (-score(adapter_id, a), a))


@dataclass(frozen=True)
class RoutingPolicy:
    """Where a RoutedClient sends each call (the module docstring tells the whole policy)."""

    replicas_per_adapter: int = 2
    """How many replicas make an adapter's home: the replicas that hold it at ordinary load."""
    max_in_flight_per_replica: int = 8
    """Calls this client may have in flight on one replica before an adapter's requests spill
    past its home to the next replica in its rank."""
    cooldown_s: float = 5.0
    """How long a replica that answered UNAVAILABLE is skipped."""
    affinity: bool = True
    """False routes every call like a base-model one (least loaded, round-robin): the
    baseline to measure adapter affinity against."""

    def __post_init__(self) -> None:
        if self.replicas_per_adapter < 1:
            raise ValueError("replicas_per_adapter must be at least 1")
        if self.max_in_flight_per_replica < 1:
            raise ValueError("max_in_flight_per_replica must be at least 1")
        if self.cooldown_s < 0:
            raise ValueError("cooldown_s must not be negative")


class NoReplicaError(LookupError):
    """No replica to pick: the router has no addresses, or all of them were excluded."""


class Router:
    """The routing policy over a set of replica addresses, with this client's in-flight
    counts and the replicas marked down. No I/O. Thread-safe: every method may be called
    from any thread."""

    def __init__(
        self,
        addresses: Iterable[str] = (),
        *,
        policy: RoutingPolicy = RoutingPolicy(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._addresses: tuple[str, ...] = ()
        self._in_flight: dict[str, int] = {}
        self._down_until: dict[str, float] = {}
        self._turn = itertools.count()
        self.update(addresses)

    @property
    def addresses(self) -> tuple[str, ...]:
        """The current replicas, sorted."""
        return self._addresses

    def update(self, addresses: Iterable[str]) -> tuple[set[str], set[str]]:
        """Replace the replica set; returns (added, removed). Counts and down marks of the
        replicas that stay are kept; a removed replica's in-flight calls are still counted
        until they are released (so its channel can be closed once it is idle)."""
        new = tuple(sorted(set(addresses)))
        with self._lock:
            added, removed = set(new) - set(self._addresses), set(self._addresses) - set(new)
            self._addresses = new
            for address in removed:
                self._down_until.pop(address, None)
                if not self._in_flight.get(address):
                    self._in_flight.pop(address, None)
            for address in added:
                self._in_flight.setdefault(address, 0)
        return added, removed

    def rank(self, adapter_id: str) -> list[str]:
        """Every replica in `adapter_id`'s rendezvous order, whatever its load or state."""
        return rank_replicas(adapter_id, self._addresses)

    def home(self, adapter_id: str) -> list[str]:
        """The replicas that hold `adapter_id` at ordinary load: the first
        `replicas_per_adapter` of its rank that are not marked down."""
        with self._lock:
            return self._live(self.rank(adapter_id), now=self._clock())[
                : self.policy.replicas_per_adapter
            ]

    def in_flight(self, address: str) -> int:
        with self._lock:
            return self._in_flight.get(address, 0)

    def is_down(self, address: str) -> bool:
        with self._lock:
            return self._clock() < self._down_until.get(address, float("-inf"))

    def mark_down(self, address: str) -> None:
        """Skip `address` for the policy's cool-down (it answered UNAVAILABLE)."""
        with self._lock:
            if address in self._addresses:
                self._down_until[address] = self._clock() + self.policy.cooldown_s

    def pick(self, adapter_id: str, *, exclude: Iterable[str] = ()) -> str:
        """Where a call for `adapter_id` ("" for none) goes now; counts nothing (see
        `acquire`). NoReplicaError when there is no address outside `exclude`."""
        with self._lock:
            return self._pick(adapter_id, set(exclude))

    def acquire(self, adapter_id: str, *, exclude: Iterable[str] = ()) -> str:
        """`pick`, and count one more call in flight there; `release` it when the call ends."""
        with self._lock:
            address = self._pick(adapter_id, set(exclude))
            self._in_flight[address] = self._in_flight.get(address, 0) + 1
            return address

    def release(self, address: str) -> None:
        with self._lock:
            count = self._in_flight.get(address, 0) - 1
            if count > 0 or address in self._addresses:
                self._in_flight[address] = max(count, 0)
            else:
                self._in_flight.pop(address, None)

    @contextmanager
    def route(self, adapter_id: str, *, exclude: Iterable[str] = ()) -> Iterator[str]:
        """`with router.route(adapter_id) as address:` acquire, and release on exit."""
        address = self.acquire(adapter_id, exclude=exclude)
        try:
            yield address
        finally:
            self.release(address)

    # --- under the lock

    def _live(self, candidates: list[str], *, now: float) -> list[str]:
        return [a for a in candidates if now >= self._down_until.get(a, float("-inf"))]

    def _pick(self, adapter_id: str, exclude: set[str]) -> str:
        if not self.policy.affinity:
            adapter_id = ""
        candidates = [a for a in self._addresses if a not in exclude]
        if not candidates:
            raise NoReplicaError("no replica to route to" if not self._addresses else "all tried")
        # Every replica down: try them all anyway rather than fail without a call.
        candidates = self._live(candidates, now=self._clock()) or candidates
        load = self._in_flight
        if not adapter_id:
            # Least loaded; ties in turn, starting one further each call.
            start = next(self._turn) % len(candidates)
            turned = candidates[start:] + candidates[:start]
            return min(turned, key=lambda a: load.get(a, 0))
        ranked = rank_replicas(adapter_id, candidates)
        home = ranked[: self.policy.replicas_per_adapter]
        best = min(home, key=lambda a: load.get(a, 0))  # min keeps the first: rank breaks ties
        limit = self.policy.max_in_flight_per_replica
        if load.get(best, 0) < limit:
            return best
        for address in ranked[len(home) :]:
            if load.get(address, 0) < limit:
                return address
        return min(ranked, key=lambda a: load.get(a, 0))


# --- replica addresses


def parse_target(target: str | Sequence[str]) -> tuple[list[str], tuple[str, int] | None]:
    """(static addresses, None) for "host1:50051,host2:50051" or a list of them; ([], (host,
    port)) for a DNS name to resolve: "dns:///name:port" or "dns:name:port"."""
    if not isinstance(target, str):
        return [t.strip() for t in target if t.strip()], None
    if target.startswith("dns:"):
        name = target.removeprefix("dns:")
        if name.startswith("//"):
            authority, _, name = name[2:].partition("/")
            if authority:
                raise ValueError(f"{target!r}: a DNS authority is not supported")
        host, port = _split_host_port(name)
        return [], (host, port)
    return [t.strip() for t in target.split(",") if t.strip()], None


def _split_host_port(name: str) -> tuple[str, int]:
    if name.startswith("["):
        host, _, rest = name[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = name.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{name!r}: expected host:port")
    return host, int(port)


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


def resolve_dns(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (a headless Service: one per ready pod), as "ip:port"."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({format_address(str(info[4][0]), port) for info in infos})


# --- the client


class RoutedClient:
    """A TuneserveClient over many replicas: the same methods, each call sent to the replica
    its Router picks (generation, classification and adapter loading by adapter, the rest to
    the least loaded). Thread-safe, like TuneserveClient."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        routing: RoutingPolicy = RoutingPolicy(),
        resolve_interval_s: float = 30.0,
        resolver: Resolver = resolve_dns,
        timeout: float | None = 30.0,
        generation_timeout: float | None = None,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 (frozen, so safe to share)
        sleep: Callable[[float], None] = time.sleep,
        **channel_options: Any,
    ) -> None:
        """
        target: "host1:50051,host2:50051", a list of addresses, or a DNS name that resolves
            to every replica ("dns:///tuneserve-serve-headless.tuneserve.svc:50051").
        routing: where calls go (RoutingPolicy).
        resolve_interval_s: how often a DNS target is resolved again (0: only at start and on
            `refresh()`).
        resolver: `resolver(host, port)` -> addresses; socket.getaddrinfo by default.
        timeout, generation_timeout: as TuneserveClient's; they bound a call over all the
            replicas it tries.
        retry: as TuneserveClient's, over replicas: a failed attempt is tried at once on the
            next replica, and the backoff waits only once every replica has been tried.
        channel_options: TuneserveClient's channel options, used for every replica: tls,
            root_certificates, certificate_chain, private_key, server_name_override, token.
            With TLS and a DNS target, the certificates are checked against the DNS name
            unless server_name_override says otherwise.
        """
        allowed = {
            "tls",
            "root_certificates",
            "certificate_chain",
            "private_key",
            "server_name_override",
            "token",
        }
        if unknown := set(channel_options) - allowed:
            raise TypeError(f"unexpected options: {', '.join(sorted(unknown))}")
        static, self._dns = parse_target(target)
        if self._dns is not None and _is_tls(channel_options):
            channel_options.setdefault("server_name_override", self._dns[0])
        self._channel_options: Mapping[str, Any] = channel_options
        self.timeout = timeout
        self.generation_timeout = generation_timeout
        self.retry = retry or RetryPolicy.off()
        self.router = Router(policy=routing)
        self._resolver = resolver
        self._sleep = sleep
        self._lock = threading.Lock()
        self._clients: dict[str, TuneserveClient] = {}
        self._retiring: dict[str, TuneserveClient] = {}
        self._closed = threading.Event()
        self._refresher: threading.Thread | None = None
        if self._dns is None:
            if not static:
                raise ValueError("no replica addresses")
            self._set_addresses(static)
        else:
            self.refresh()
            if resolve_interval_s > 0:
                self._refresher = threading.Thread(
                    target=self._refresh_every,
                    args=(resolve_interval_s,),
                    name="tuneserve-resolver",
                    daemon=True,
                )
                self._refresher.start()

    def __enter__(self) -> RoutedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        if self._refresher is not None:
            self._refresher.join(5)
        with self._lock:
            clients = [*self._clients.values(), *self._retiring.values()]
            self._clients, self._retiring = {}, {}
        for client in clients:
            client.close()

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.router.addresses

    def refresh(self) -> None:
        """Resolve a DNS target now; a failed or empty answer keeps the replicas there are."""
        if self._dns is None:
            return
        try:
            addresses = self._resolver(*self._dns)
        except OSError as e:
            log.warning("resolving %s:%d failed: %s", *self._dns, e)
            return
        if not addresses:
            log.warning("%s:%d resolved to no address; keeping %s", *self._dns, self.addresses)
            return
        self._set_addresses(addresses)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every replica's health is SERVING."""
        deadline = time.monotonic() + timeout
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            client.wait_ready(timeout=max(0.0, deadline - time.monotonic()))

    # --- jobs

    def train(self, *, request_id: str = "", timeout: Timeout = DEFAULT, **fields: Any) -> pb.Job:
        """TuneserveClient.train's arguments. The request_id is made once, so a submit tried
        again on another replica returns the job the first attempt queued."""
        request_id = request_id or uuid.uuid4().hex
        return self._call(
            "",
            lambda c, t: c.train(request_id=request_id, timeout=t, **fields),
            timeout,
        )

    def get_status(self, job_id: str, *, timeout: Timeout = DEFAULT) -> pb.Job:
        return self._call("", lambda c, t: c.get_status(job_id, timeout=t), timeout)

    def loss_curve(self, job_id: str, *, timeout: Timeout = DEFAULT) -> list[pb.LossPoint]:
        return self._call("", lambda c, t: c.loss_curve(job_id, timeout=t), timeout)

    def cancel(self, job_id: str, *, timeout: Timeout = DEFAULT) -> pb.Job:
        return self._call("", lambda c, t: c.cancel(job_id, timeout=t), timeout)

    def list_jobs(
        self,
        *,
        state: pb.JobState = pb.JOB_STATE_UNSPECIFIED,
        page_size: int = 50,
        timeout: Timeout = DEFAULT,
    ) -> Iterator[pb.Job]:
        """Every job, newest first; all pages from one replica (`timeout` is per page)."""
        per_page = timeout

        def jobs(client: TuneserveClient, _: float | None) -> Iterator[pb.Job]:
            return client.list_jobs(state=state, page_size=page_size, timeout=per_page)

        return self._stream("", jobs, timeout, slow=False)

    def wait_for_job(
        self,
        job_id: str,
        *,
        on_progress: Callable[[pb.Job], None] | None = None,
        poll_s: float = 0.5,
        timeout: float | None = None,
    ) -> pb.Job:
        """As TuneserveClient.wait_for_job; each poll may go to another replica."""
        return poll_job(
            self.get_status,
            job_id,
            on_progress=on_progress,
            poll_s=poll_s,
            timeout=timeout,
            sleep=self._sleep,
        )

    wait = wait_for_job

    # --- adapters

    def list_adapters(self, *, timeout: Timeout = DEFAULT) -> list[pb.Adapter]:
        return self._call("", lambda c, t: c.list_adapters(timeout=t), timeout)

    def get_adapter(self, adapter_id: str, *, timeout: Timeout = DEFAULT) -> pb.Adapter:
        return self._call("", lambda c, t: c.get_adapter(adapter_id, timeout=t), timeout)

    def load_adapter(
        self, adapter_id: str, *, pin: bool = False, timeout: Timeout = DEFAULT
    ) -> pb.Adapter:
        """Load (and pin) the adapter on each of its home replicas, where its requests go."""
        return self._on_home(
            adapter_id,
            lambda c, t: c.load_adapter(adapter_id, pin=pin, timeout=t),
            timeout,
            slow=True,
        )

    def unload_adapter(self, adapter_id: str, *, timeout: Timeout = DEFAULT) -> pb.Adapter:
        """Unload (and unpin) the adapter on each of its home replicas."""
        return self._on_home(
            adapter_id, lambda c, t: c.unload_adapter(adapter_id, timeout=t), timeout, slow=False
        )

    def import_adapter(
        self, path: str, adapter_id: str, *, timeout: Timeout = DEFAULT
    ) -> pb.Adapter:
        return self._call(
            "", lambda c, t: c.import_adapter(path, adapter_id, timeout=t), timeout, slow=True
        )

    def delete_adapter(self, adapter_id: str, *, timeout: Timeout = DEFAULT) -> None:
        self._call("", lambda c, t: c.delete_adapter(adapter_id, timeout=t), timeout)

    # --- generation and classification

    def classify(
        self, adapter_id: str, texts: Iterable[str], *, timeout: Timeout = DEFAULT
    ) -> list[pb.Classification]:
        texts = list(texts)
        return self._call(
            adapter_id, lambda c, t: c.classify(adapter_id, texts, timeout=t), timeout, slow=True
        )

    def generate(
        self, prompt: str, *, adapter_id: str = "", timeout: Timeout = DEFAULT, **parameters: Any
    ) -> pb.GenerateResponse:
        return self._call(
            adapter_id,
            lambda c, t: c.generate(prompt, adapter_id=adapter_id, timeout=t, **parameters),
            timeout,
            slow=True,
        )

    def generate_stream(
        self, prompt: str, *, adapter_id: str = "", timeout: Timeout = DEFAULT, **parameters: Any
    ) -> Iterator[pb.GenerateStreamResponse]:
        """As TuneserveClient.generate_stream: tried on another replica only while no message
        has arrived; the call counts as in flight on its replica until the stream ends."""

        def chunks(client: TuneserveClient, t: float | None) -> Iterator[pb.GenerateStreamResponse]:
            return client.generate_stream(prompt, adapter_id=adapter_id, timeout=t, **parameters)

        return self._stream(adapter_id, chunks, timeout, slow=True)

    # --- routing

    def _deadline(self, timeout: Timeout, *, slow: bool) -> float | None:
        if timeout is DEFAULT:
            timeout = self.generation_timeout if slow else self.timeout
        return None if timeout is None else time.monotonic() + timeout

    def _attempts(
        self, key: str, deadline: float | None
    ) -> Iterator[tuple[str, TuneserveClient, float | None, list[ClientError]]]:
        """Yield (address, client, attempt timeout, failures) for each attempt; the caller
        appends the attempt's ClientError to `failures` when it is worth another try, and
        must release the address. Raises the last failure once the policy gives up."""
        policy, started = self.retry, time.monotonic()
        failures: list[ClientError] = []
        tried: set[str] = set()
        rounds = 0
        while True:
            if failures:
                error = failures[-1]
                if len(failures) >= policy.max_attempts:
                    raise error
                if tried >= set(self.addresses):  # every replica tried: back off, then again
                    rounds += 1
                    wait = policy.backoff_s(rounds, hint_s=error.retry_after_s)
                    now = time.monotonic()
                    if now + wait > started + policy.max_elapsed_s or (
                        deadline is not None and now + wait >= deadline
                    ):
                        raise error
                    self._sleep(wait)
                    tried.clear()
            try:
                address = self.router.acquire(key, exclude=tried)
            except NoReplicaError:
                if failures:
                    raise failures[-1] from None
                raise ClientError(grpc.StatusCode.UNAVAILABLE, "no replica to call") from None
            client = self._client(address)
            if client is None:  # removed by a refresh since the pick
                self._release(address)
                tried.add(address)
                continue
            tried.add(address)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            before = len(failures)
            yield address, client, timeout, failures
            if len(failures) == before:
                return
            if failures[-1].code == grpc.StatusCode.UNAVAILABLE:
                log.info("replica %s unavailable; skipping it for a while", address)
                self.router.mark_down(address)

    def _call(
        self,
        key: str,
        invoke: Callable[[TuneserveClient, float | None], T],
        timeout: Timeout,
        *,
        slow: bool = False,
    ) -> T:
        for address, client, attempt_timeout, failures in self._attempts(
            key, self._deadline(timeout, slow=slow)
        ):
            try:
                return invoke(client, attempt_timeout)
            except ClientError as e:
                if e.code not in self.retry.codes:
                    raise
                failures.append(e)
            finally:
                self._release(address)
        raise AssertionError("unreachable: _attempts raises when it gives up")

    def _stream(
        self,
        key: str,
        open_stream: Callable[[TuneserveClient, float | None], Iterator[T]],
        timeout: Timeout,
        *,
        slow: bool,
    ) -> Iterator[T]:
        for address, client, attempt_timeout, failures in self._attempts(
            key, self._deadline(timeout, slow=slow)
        ):
            stream = open_stream(client, attempt_timeout)
            try:
                try:
                    head = next(stream)
                except StopIteration:
                    return
                except ClientError as e:
                    if e.code not in self.retry.codes:
                        raise
                    failures.append(e)
                    continue
                yield head
                yield from stream
                return
            finally:
                if isinstance(stream, Generator):
                    stream.close()  # cancels the call when it has not ended
                self._release(address)

    def _on_home(
        self,
        adapter_id: str,
        invoke: Callable[[TuneserveClient, float | None], T],
        timeout: Timeout,
        *,
        slow: bool,
    ) -> T:
        deadline = self._deadline(timeout, slow=slow)
        result: T | None = None
        for address in self.router.home(adapter_id) or self.router.rank(adapter_id)[:1]:
            client = self._client(address)
            if client is None:
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = invoke(client, left)
        if result is None:
            raise ClientError(grpc.StatusCode.UNAVAILABLE, "no replica to call")
        return result

    # --- replicas

    def _client(self, address: str) -> TuneserveClient | None:
        with self._lock:
            return self._clients.get(address)

    def _release(self, address: str) -> None:
        self.router.release(address)
        with self._lock:
            retired = (
                self._retiring.pop(address, None) if self.router.in_flight(address) == 0 else None
            )
        if retired is not None:
            retired.close()

    def _set_addresses(self, addresses: Iterable[str]) -> None:
        added, removed = self.router.update(addresses)
        idle = []
        with self._lock:
            if self._closed.is_set():
                return
            for address in added:
                kept = self._retiring.pop(address, None)
                self._clients[address] = kept or TuneserveClient(
                    address,
                    timeout=self.timeout,
                    generation_timeout=self.generation_timeout,
                    retry=None,  # this client retries, on another replica
                    **self._channel_options,
                )
            for address in removed:
                client = self._clients.pop(address)
                if self.router.in_flight(address):
                    self._retiring[address] = client  # closed by the last call's release
                else:
                    idle.append(client)
        for client in idle:
            client.close()
        if added or removed:
            log.info("replicas: +%s -%s", sorted(added), sorted(removed))

    def _refresh_every(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            self.refresh()


def _is_tls(options: Mapping[str, Any]) -> bool:
    return bool(
        options.get("tls")
        or options.get("root_certificates") is not None
        or options.get("certificate_chain") is not None
    )
