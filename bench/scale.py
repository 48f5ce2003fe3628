"""Scale-out benchmark (issue 19): what many replicas on a shared PostgreSQL job store and
S3 object storage give, each figure against its baseline measured in the same run.

1. **Claims.** W worker processes (1, 2, 4, 8), each with its own job store on one fresh
   database, `claim` and `finish` (SUCCEEDED) N queued jobs until none is left: claims per
   second, and every job claimed exactly once (attempts == 1). The same on SQLite (one file
   shared by the W processes), the embedded baseline.
2. **Adapter cold load.** The first Generate naming an adapter on a replica whose artifact
   store is S3 (an S3-protocol server over HTTP on localhost: the replica pulls the files
   into its local cache) vs one whose store is a local directory; the second request for the
   same adapter (warm) is the reference. Both replicas use the PostgreSQL job store, so only
   the artifact store differs. Medians over several adapters (one LoRA adapter imported under
   several names: each name is its own upload, key and load).
3. **Affinity vs round-robin.** Three replicas (roles serve, serve, all; PostgreSQL job store,
   S3 artifact store, `--max-loaded-adapters 4`, so no replica holds every adapter), 30
   adapters, a request stream with Zipf-like adapter popularity sent by several closed-loop
   client threads through RoutedClient with RoutingPolicy() (adapter affinity: an adapter's
   home is 2 replicas) and RoutingPolicy(affinity=False) (round-robin), and in the full run
   RoutingPolicy(replicas_per_adapter=1) too, each on freshly started replicas (empty
   caches, in memory and on disk), the same stream for all. Adapter cache hit rate from each
   replica's /metrics (1 - adapter loads / generation requests), latency p50/p95 and
   throughput. The adapters are imported beforehand by part 2's S3 replica (same database
   and bucket), so no replica measured here did an import.

Every measured window also records the cores the benchmark's processes (this one, its
replicas and workers, the S3 server, PostgreSQL's server) and all other processes kept
busy: figures taken while other processes are busy are slowed by work not the benchmark's.

The replicas are real `tuneserve serve` processes, started as the end-to-end tests start
them (tests/support.py), against a real PostgreSQL (tests/postgres.py: Debian's server,
started here) and moto's S3 server (tests/s3server.py). The model is bench.common's
GPT-2-shaped one (random weights, 256 wide, 4 layers); each replica runs torch on one thread
(three replicas share two cores here).

    python -m bench.scale            # writes bench/results/scale.json
    python -m bench.scale --quick    # smaller sizes, for the smoke test

This module is imported by the claim workers' processes too (multiprocessing's spawn), so its
top level imports nothing heavy: torch, the client and the test harness are imported where
they are used."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib
import multiprocessing
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

from tuneserve.jobs.model import DatasetFormat, Job, JobSpec, JobState
from tuneserve.jobs.store import open_job_store

# The test suite's harness (tests/support.py, tests/postgres.py, tests/s3server.py) is not one
# of the typed packages: imported at run time (`_harness`) and typed Any here.
ServerProcess = Any
PostgresServer = Any
S3Endpoint = Any

_ENTRY_RE = re.compile(r"^[0-9a-f]{64}$")  # an entry of storage/cache.py
RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = 16  # distinct prompts in the request stream


@dataclasses.dataclass(frozen=True)
class Settings:
    claim_jobs: int = 400
    claim_workers: tuple[int, ...] = (1, 2, 4, 8)
    claim_repeats: int = 3
    routing_repeats: int = 3  # each policy; the order rotates
    # RoutingPolicy() against the round-robin baseline, and an adapter on one replica only.
    policies: tuple[str, ...] = ("affinity", "round_robin", "affinity_one_home")
    cold_adapters: int = 8
    adapters: int = 30
    requests: int = 600  # per policy
    clients: int = 6
    max_loaded_adapters: int = 4
    zipf_s: float = 1.0
    max_new_tokens: int = 4
    lora_r: int = 16
    replica_threads: int = 1
    seed: int = 0


FULL = Settings()
QUICK = Settings(
    claim_jobs=80,
    claim_repeats=1,
    routing_repeats=1,
    policies=("affinity", "round_robin"),
    cold_adapters=3,
    adapters=12,
    requests=96,
    clients=4,
)

ROLES = ("serve", "serve", "all")
# The routing contenders: RoutingPolicy's settings and the table's label for each.
POLICIES: dict[str, tuple[dict[str, Any], str]] = {
    "affinity": ({}, "affinity: RoutingPolicy()"),
    "round_robin": ({"affinity": False}, "round-robin: affinity=False"),
    "affinity_one_home": ({"replicas_per_adapter": 1}, "affinity, replicas_per_adapter=1"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (the smoke test's)")
    parser.add_argument(
        "--output", type=Path, help="results file (default bench/results/scale[-quick].json)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of each claim point and each routing policy, medians reported (default: "
        "3 runs of each, quick 1)",
    )
    return parser.parse_args(argv)


# --- contention -----------------------------------------------------------------------------


def _machine_ticks() -> int:
    """CPU time the whole machine has used (steal included), in clock ticks."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return user + nice + system + irq + softirq + steal


def _tree_ticks(roots: Sequence[int]) -> int:
    """CPU time used so far by `roots` and every process below them, ended ones included
    (a parent's cutime and cstime count the children it waited for), in clock ticks."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            stats[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


class Contention:
    """Cores kept busy over a window by the benchmark (this process, its replicas and
    workers, the S3 server, PostgreSQL's server) and by everything else on the machine: on a
    shared machine, figures taken while "other" is well above zero are slowed by work that
    is not the benchmark's."""

    def __init__(self, roots: Callable[[], Sequence[int]]) -> None:
        self._roots = roots
        self._start = self._read()

    def _read(self) -> tuple[float, int, int] | None:
        try:
            return time.perf_counter(), _machine_ticks(), _tree_ticks(self._roots())
        except (OSError, ValueError):
            return None  # not Linux's /proc

    def cores(self) -> dict[str, float | None]:
        now, then = self._read(), self._start
        if now is None or then is None or now[0] <= then[0]:
            return {"bench_cpu_cores": None, "other_cpu_cores": None}
        ticks = (now[0] - then[0]) * os.sysconf("SC_CLK_TCK")
        bench = (now[2] - then[2]) / ticks
        other = max(0.0, (now[1] - then[1]) / ticks - bench)
        return {"bench_cpu_cores": bench, "other_cpu_cores": other}


def bench_roots(pg: PostgresServer) -> Callable[[], list[int]]:
    """The benchmark's process trees: this process (replicas, workers, the S3 server) and
    PostgreSQL's server (not a child: pg_ctl starts it in the background)."""

    def roots() -> list[int]:
        found = [os.getpid()]
        with contextlib.suppress(OSError, ValueError, IndexError):
            found.append(int((pg.data / "postmaster.pid").read_text().split()[0]))
        return found

    return roots


# --- 1. claims ------------------------------------------------------------------------------


def _claim_worker(
    url: str, worker: str, lease_s: float, start: Any, out: Any
) -> None:  # pragma: no cover - runs in a child process
    """One worker process: its own store; after `start` (a Barrier), claim and finish jobs
    until none is left; put (worker, claims, monotonic end time) on `out`."""
    try:
        store = open_job_store(url, default_path=Path(os.devnull))
        start.wait()
        claims = 0
        while (job := store.claim(worker, lease_s)) is not None:
            job.state = JobState.SUCCEEDED
            job.finished_at = time.time()
            store.finish(job)
            claims += 1
        ended = time.monotonic()
        store.close()
        out.put((worker, claims, ended, None))
    except BaseException as e:
        with contextlib.suppress(Exception):
            start.abort()
        out.put((worker, 0, time.monotonic(), f"{type(e).__name__}: {e}"))


def _queue_jobs(url: str, n: int) -> None:
    store = open_job_store(url, default_path=Path(os.devnull))
    try:
        for i in range(n):
            spec = JobSpec(
                base_model="bench",
                adapter_id=f"claim-{i:05d}",
                dataset_format=DatasetFormat.TEXT,
                dataset_rows=1,
            )
            store.insert(Job(id=uuid.uuid4().hex, spec=spec))
    finally:
        store.close()


def claim_run(
    url: str, jobs: int, workers: int, roots: Callable[[], Sequence[int]]
) -> dict[str, Any]:
    """N jobs queued in the empty store at `url`, then claimed and finished by `workers`
    processes started together; the store checked afterwards."""
    _queue_jobs(url, jobs)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_claim_worker, args=(url, f"w{i}", 300.0, start, out), daemon=True)
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        start.wait(timeout=120)  # every worker connected (and migrated): the clock starts
        began = time.monotonic()
        contention = Contention(roots)
        reports = [out.get(timeout=300) for _ in procs]
        cores = contention.cores()
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    errors = [r[3] for r in reports if r[3]]
    if errors:
        raise RuntimeError(f"claim workers failed: {errors}")
    seconds = max(r[2] for r in reports) - began
    store = open_job_store(url, default_path=Path(os.devnull))
    try:
        done = store.in_states(JobState.SUCCEEDED)
        left = store.in_states(JobState.QUEUED, JobState.RUNNING)
    finally:
        store.close()
    per_worker = sorted(r[1] for r in reports)
    return {
        "workers": workers,
        "jobs": jobs,
        "seconds": seconds,
        "claims_per_s": jobs / seconds,
        "claims_per_worker": per_worker,
        "succeeded": len(done),
        "left": len(left),
        **cores,
        "exactly_once": (
            len(done) == jobs
            and not left
            and all(j.attempts == 1 for j in done)
            and sum(per_worker) == jobs
        ),
    }


def measure_claims(s: Settings, pg: PostgresServer, work: Path, repeats: int) -> dict[str, Any]:
    roots = bench_roots(pg)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        "postgresql": {str(w): [] for w in s.claim_workers},
        "sqlite": {str(w): [] for w in s.claim_workers},
    }
    for repeat in range(repeats):
        for store in _rotated(("postgresql", "sqlite"), repeat):
            for w in s.claim_workers:
                if store == "postgresql":
                    url = pg.create_database()
                    try:
                        run = claim_run(url, s.claim_jobs, w, roots)
                    finally:
                        pg.drop_database(url)
                else:
                    path = work / f"claims-{uuid.uuid4().hex}.db"
                    run = claim_run(f"sqlite://{path}", s.claim_jobs, w, roots)
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{path}{suffix}").unlink(missing_ok=True)
                runs[store][str(w)].append(run)
                _log(
                    f"[{repeat + 1}/{repeats}] claims {store:10} {w} workers: "
                    f"{run['claims_per_s']:7.0f}/s, per worker {run['claims_per_worker']}, "
                    f"exactly once {run['exactly_once']}"
                )
    return runs


# --- the cluster ----------------------------------------------------------------------------


@dataclasses.dataclass
class Harness:
    settings: Settings
    work: Path
    model: Path
    adapter: Path  # a PEFT LoRA adapter's directory, under work/imports
    adapter_bytes: int
    prompts: list[str]
    pg: PostgresServer
    s3: S3Endpoint
    db_url: str  # PostgreSQL: the S3 replicas' job store
    bucket: str
    data_dirs: dict[str, Path] = dataclasses.field(default_factory=dict)  # by target

    def start(
        self, name: str, *extra: str, job_store: str | None = None, s3: bool = True
    ) -> ServerProcess:
        store = ("--artifact-store", f"s3://{self.bucket}/tuneserve") if s3 else ()
        data = self.work / f"{name}-{uuid.uuid4().hex[:8]}"
        server = _harness("support").ServerProcess(
            self.model,
            data,
            *("--replica-id", name, "--job-store", job_store or self.db_url, *store),
            *("--adapter-import-roots", str(self.adapter.parent)),
            *extra,
            env={**self.s3.env(), "OMP_NUM_THREADS": str(self.settings.replica_threads)},
        )
        self.data_dirs[server.target] = data
        return server

    def pulls(self, server: ServerProcess) -> int:
        """Adapters a replica pulled from the artifact store into its local cache
        (data_dir/adapter-cache, one entry per key, none evicted at this size): the
        distinct adapters it loaded."""
        cache = self.data_dirs[server.target] / "adapter-cache"
        return sum(1 for p in cache.iterdir() if _ENTRY_RE.match(p.name)) if cache.is_dir() else 0

    def generate(self, client: Any, adapter_id: str) -> float:
        """Seconds for one greedy Generate (the client's view)."""
        began = time.perf_counter()
        client.generate(
            self.prompts[0],
            adapter_id=adapter_id,
            greedy=True,
            max_new_tokens=self.settings.max_new_tokens,
            timeout=120,
        )
        return time.perf_counter() - began


def stop_all(servers: Sequence[ServerProcess]) -> None:
    for server in servers:
        if server.proc.poll() is None:
            try:
                server.stop(signal.SIGTERM)
            except Exception:  # a stuck replica is killed
                server.proc.kill()
                server.proc.wait(10)


def start_together(starters: Sequence[Callable[[], ServerProcess]]) -> list[ServerProcess]:
    """Start replicas in parallel (each waits for its SERVING); all stopped if one fails."""
    with futures.ThreadPoolExecutor(len(starters)) as pool:
        pending = [pool.submit(f) for f in starters]
        futures.wait(pending)
    started = [f.result() for f in pending if f.exception() is None]
    if len(started) < len(pending):
        stop_all(started)
        for f in pending:
            if (e := f.exception()) is not None:
                raise e
    return started


def scrape(server: ServerProcess) -> dict[str, float]:
    """The counters this benchmark reads from a replica's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {"requests": 0.0, "errors": 0.0, "loads": 0.0, "evictions": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tuneserve_generation_requests_total":
                values["requests"] += sample.value
                if sample.labels.get("outcome") in ("ERROR", "CANCELLED"):
                    values["errors"] += sample.value
            elif sample.name == "tuneserve_adapter_loads_total":
                values["loads"] += sample.value
            elif sample.name == "tuneserve_adapter_evictions_total":
                values["evictions"] += sample.value
    return values


# --- 2. adapter cold load -------------------------------------------------------------------


def measure_cold_load(h: Harness, tenants: Sequence[str]) -> dict[str, Any]:
    """Cold and warm Generate on an S3 replica and a local-directory one, adapter by adapter,
    the two replicas alternating which goes first. The S3 replica then imports `tenants`
    into the shared store for the routing runs, so that none of their replicas did an
    import (which could leave files in its cache)."""
    s = h.settings
    local_db = h.pg.create_database()
    names = [f"cold-{i:02d}" for i in range(s.cold_adapters + 1)]  # the first warms up
    slots = ("--max-loaded-adapters", str(len(names) + 1))  # no eviction in the timings
    servers = start_together(
        [
            lambda: h.start("cold-s3", *slots),
            lambda: h.start("cold-local", *slots, job_store=local_db, s3=False),
        ]
    )
    kinds = dict(zip(("s3", "local"), servers, strict=True))
    times: dict[str, dict[str, list[float]]] = {k: {"cold": [], "warm": []} for k in kinds}
    try:
        for server in servers:
            for name in names:
                server.client.import_adapter(str(h.adapter), name, timeout=120)
            h.generate(server.client, "")  # the base model's first forward
        contention = Contention(bench_roots(h.pg))
        for i, name in enumerate(names):
            for kind in _rotated(tuple(kinds), i):
                cold = h.generate(kinds[kind].client, name)
                warm = h.generate(kinds[kind].client, name)
                if i == 0:
                    continue  # the first adapter load of the process: warm-up
                times[kind]["cold"].append(cold)
                times[kind]["warm"].append(warm)
                _log(
                    f"cold load {kind:5} {name}: cold {cold * 1e3:6.1f} ms, warm {warm * 1e3:5.1f}"
                )
        cores = contention.cores()
        loads = {kind: scrape(server)["loads"] for kind, server in kinds.items()}
        for name in tenants:  # the index and the files are shared: once for every replica
            kinds["s3"].client.import_adapter(str(h.adapter), name, timeout=120)
    finally:
        stop_all(servers)
        h.pg.drop_database(local_db)
    out: dict[str, Any] = {}
    for kind, t in times.items():
        cold_ms = statistics.median(t["cold"]) * 1e3
        warm_ms = statistics.median(t["warm"]) * 1e3
        out[kind] = {
            "cold_ms_p50": cold_ms,
            "warm_ms_p50": warm_ms,
            "load_ms_p50": statistics.median(c - w for c, w in zip(*t.values(), strict=True)) * 1e3,
            "cold_ms": [x * 1e3 for x in t["cold"]],
            "warm_ms": [x * 1e3 for x in t["warm"]],
            "adapter_loads": loads[kind],
        }
    out["s3_over_local_cold"] = out["s3"]["cold_ms_p50"] / out["local"]["cold_ms_p50"]
    out["adapters"] = s.cold_adapters
    out["adapter_bytes"] = h.adapter_bytes
    out.update(cores)
    return out


# --- 3. affinity vs round-robin -------------------------------------------------------------


def request_stream(s: Settings, adapters: Sequence[str], prompts: Sequence[str]) -> list[tuple]:
    """(adapter, prompt) pairs: adapter popularity Zipf-like (the k-th most popular weighs
    1 / k**s), popularity ranks in a random order of the names."""
    rng = random.Random(s.seed)
    ranked = list(adapters)
    rng.shuffle(ranked)
    weights = [1 / (k + 1) ** s.zipf_s for k in range(len(ranked))]
    chosen = rng.choices(ranked, weights=weights, k=s.requests)
    return [(a, rng.choice(prompts)) for a in chosen]


def run_policy(
    h: Harness, policy: str, stream: Sequence[tuple[str, str]], adapters: Sequence[str]
) -> dict[str, Any]:
    """Fresh replicas (empty adapter caches, memory and disk), the stream sent through a
    RoutedClient with `policy` by closed-loop client threads."""
    from tuneserve_client import RetryPolicy, RoutedClient, RoutingPolicy

    s = h.settings
    slots = ("--max-loaded-adapters", str(s.max_loaded_adapters))
    servers = start_together(
        [
            functools.partial(h.start, f"r{i}-{role}", "--role", role, *slots)
            for i, role in enumerate(ROLES)
        ]
    )
    try:
        for server in servers:
            h.generate(server.client, "")  # the base model's first forward, on every replica
        before = [scrape(server) for server in servers]
        routing = RoutingPolicy(**POLICIES[policy][0])
        latencies: list[float] = []
        failures: list[str] = []
        lock = threading.Lock()
        todo = iter(stream)
        with RoutedClient(
            [server.target for server in servers],
            routing=routing,
            generation_timeout=120,
            retry=RetryPolicy(max_attempts=5, max_elapsed_s=60),
        ) as routed:

            def client() -> None:
                while True:
                    with lock:
                        item = next(todo, None)
                    if item is None:
                        return
                    adapter, prompt = item
                    began = time.perf_counter()
                    try:
                        routed.generate(
                            prompt,
                            adapter_id=adapter,
                            greedy=True,
                            max_new_tokens=s.max_new_tokens,
                        )
                    except Exception as e:  # counted and reported
                        with lock:
                            failures.append(f"{type(e).__name__}: {e}")
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - began)

            contention = Contention(bench_roots(h.pg))
            began = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(s.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - began
            cores = contention.cores()
        after = _settled(servers, before, len(latencies) + len(failures))
    finally:
        stop_all(servers)
    from bench.common import percentile

    counted = ("requests", "loads", "evictions", "errors")
    deltas = [{k: after[i][k] - before[i][k] for k in counted} for i in range(len(ROLES))]
    per_replica: list[dict[str, Any]] = [
        {"role": role, **d, "s3_pulls": h.pulls(server)}
        for role, d, server in zip(ROLES, deltas, servers, strict=True)
    ]
    requests = sum(r["requests"] for r in per_replica)
    loads = sum(r["loads"] for r in per_replica)
    return {
        "policy": policy,
        "routing": dataclasses.asdict(routing),
        "requests": len(latencies),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "seconds": wall,
        "throughput_rps": len(latencies) / wall,
        "latency_ms_p50": _ms(percentile(latencies, 50)),
        "latency_ms_p95": _ms(percentile(latencies, 95)),
        "latency_ms_mean": _ms(statistics.fmean(latencies) if latencies else None),
        "adapter_loads": loads,
        "server_requests": requests,
        "hit_rate": 1 - loads / requests if requests else None,
        "s3_pulls": sum(r["s3_pulls"] for r in per_replica),
        # Requests per second of CPU the benchmark's processes used: the cost of a request,
        # less sensitive than throughput to what other processes take from the machine.
        "requests_per_cpu_s": (
            len(latencies) / wall / cores["bench_cpu_cores"] if cores["bench_cpu_cores"] else None
        ),
        "per_replica": per_replica,
        **cores,
    }


def _settled(
    servers: Sequence[ServerProcess], before: list[dict[str, float]], total: int
) -> list[dict[str, float]]:
    """The replicas' counters once their generations since `before` add up to `total` (a
    request is counted a moment after its answer may reach the client)."""
    deadline = time.monotonic() + 10
    while True:
        now = [scrape(server) for server in servers]
        done = sum(n["requests"] - b["requests"] for n, b in zip(now, before, strict=True))
        if done >= total or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def measure_routing(
    h: Harness, adapters: Sequence[str], repeats: int
) -> dict[str, list[dict[str, Any]]]:
    s = h.settings
    stream = request_stream(s, adapters, h.prompts)
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in s.policies}
    for repeat in range(repeats):
        for policy in _rotated(s.policies, repeat):
            run = run_policy(h, policy, stream, adapters)
            runs[policy].append(run)
            _log(
                f"[{repeat + 1}/{repeats}] {policy:11}: hit rate {_pct(run['hit_rate'])}, "
                f"{run['adapter_loads']:.0f} loads / {run['server_requests']:.0f} requests, "
                f"p50 {run['latency_ms_p50']:.0f} ms, p95 {run['latency_ms_p95']:.0f} ms, "
                f"{run['throughput_rps']:.1f} req/s, failures {run['failures']}; per replica "
                f"{[int(r['requests']) for r in run['per_replica']]} requests, "
                f"{[int(r['loads']) for r in run['per_replica']]} loads, "
                f"{[r['s3_pulls'] for r in run['per_replica']]} S3 pulls; other processes "
                f"{_fmt(run['other_cpu_cores'], '.2f')} cores"
            )
    return runs


# --- summary --------------------------------------------------------------------------------


def summarise(
    claims: dict[str, dict[str, list[dict[str, Any]]]],
    cold: dict[str, Any],
    routing: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    from bench.common import median, ratio

    claims_per_s = {
        store: {w: statistics.median(r["claims_per_s"] for r in runs) for w, runs in by_w.items()}
        for store, by_w in claims.items()
    }
    exactly_once = all(
        r["exactly_once"] for by_w in claims.values() for rs in by_w.values() for r in rs
    )
    policies: dict[str, dict[str, Any]] = {}
    for policy, runs in routing.items():
        policies[policy] = {
            key: median([r[key] for r in runs])
            for key in (
                "hit_rate",
                "s3_pulls",
                "latency_ms_p50",
                "latency_ms_p95",
                "throughput_rps",
                "requests_per_cpu_s",
            )
        }
        policies[policy]["failures"] = sum(r["failures"] for r in runs)
    a, rr = policies["affinity"], policies["round_robin"]
    claim_runs = [r for by_w in claims.values() for rs in by_w.values() for r in rs]
    routing_runs = [r for runs in routing.values() for r in runs]
    return {
        "claims_per_s": claims_per_s,
        "claims_exactly_once": exactly_once,
        "postgresql_over_sqlite": {
            w: claims_per_s["postgresql"][w] / claims_per_s["sqlite"][w]
            for w in claims_per_s["postgresql"]
        },
        "cold_load_ms": {
            kind: {k: cold[kind][k] for k in ("cold_ms_p50", "warm_ms_p50", "load_ms_p50")}
            for kind in ("s3", "local")
        },
        "s3_over_local_cold": cold["s3_over_local_cold"],
        "routing": policies,
        "affinity_over_round_robin": {
            "hit_rate_points": a["hit_rate"] - rr["hit_rate"],
            "latency_p50": a["latency_ms_p50"] / rr["latency_ms_p50"],
            "latency_p95": a["latency_ms_p95"] / rr["latency_ms_p95"],
            "throughput": a["throughput_rps"] / rr["throughput_rps"],
            "requests_per_cpu_s": ratio(a["requests_per_cpu_s"], rr["requests_per_cpu_s"]),
        },
        "other_cpu_cores": {
            "claims": median([r["other_cpu_cores"] for r in claim_runs]),
            "cold_load": cold["other_cpu_cores"],
            "routing": median([r["other_cpu_cores"] for r in routing_runs]),
        },
    }


def table(report: dict[str, Any]) -> str:
    c = report["claims_per_s"]
    lines = [
        "jobs claimed and finished per second",
        "| workers | PostgreSQL | SQLite (embedded) | vs SQLite |",
        "|---|---|---|---|",
    ]
    for w in c["postgresql"]:
        lines.append(
            f"| {w} | {c['postgresql'][w]:.0f} | {c['sqlite'][w]:.0f} | "
            f"{report['postgresql_over_sqlite'][w]:.2f} |"
        )
    lines.append(f"every job claimed exactly once: {report['claims_exactly_once']}")
    cold = report["cold_load_ms"]
    lines += [
        "",
        "adapter cold load (Generate, median ms)",
        "| artifact store | cold | warm | cold - warm |",
        "|---|---|---|---|",
    ]
    for kind, label in (("s3", "S3 (HTTP)"), ("local", "local directory")):
        v = cold[kind]
        cells = (v["cold_ms_p50"], v["warm_ms_p50"], v["load_ms_p50"])
        lines.append(f"| {label} | " + " | ".join(f"{x:.1f}" for x in cells) + " |")
    lines.append(f"S3 cold / local cold: {report['s3_over_local_cold']:.2f}x")
    lines += [
        "",
        "3 replicas, adapters with Zipf popularity",
        "| routing | hit rate | S3 pulls | p50 ms | p95 ms | requests/s | per CPU-s | failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for policy, r in report["routing"].items():
        label = POLICIES[policy][1]
        lines.append(
            f"| {label} | {_pct(r['hit_rate'])} | {r['s3_pulls']:.0f} | "
            f"{r['latency_ms_p50']:.0f} | {r['latency_ms_p95']:.0f} | "
            f"{r['throughput_rps']:.1f} | {_fmt(r['requests_per_cpu_s'], '.1f')} | "
            f"{r['failures']} |"
        )
    other = report["other_cpu_cores"]
    lines.append(
        "\nother processes kept busy (median cores, of "
        f"{os.cpu_count()}): claims {_fmt(other['claims'], '.2f')}, cold load "
        f"{_fmt(other['cold_load'], '.2f')}, routing {_fmt(other['routing'], '.2f')}"
    )
    return "\n".join(lines)


# --- setup and main -------------------------------------------------------------------------


def make_adapter(model: Path, out: Path, r: int, seed: int) -> int:
    """A PEFT LoRA adapter on every linear layer of the base model, random (non-zero) A and
    B, saved as PEFT saves it; returns its bytes."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneserve.models import load_model

    torch.manual_seed(seed)
    base = load_model(str(model), device=torch.device("cpu"), dtype=torch.float32)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=2 * r,
        target_modules=["c_attn", "c_proj", "c_fc"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    get_peft_model(base, config).save_pretrained(str(out))
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    import torch

    import tuneserve
    from bench.common import (
        LengthMix,
        ModelShape,
        build_model_dir,
        environment,
        make_rows,
        source_revision,
        write_json,
    )
    from tuneserve.logs import quiet_libraries

    quiet_libraries()
    s = QUICK if args.quick else FULL
    if args.repeats:
        s = dataclasses.replace(s, claim_repeats=args.repeats, routing_repeats=args.repeats)
    output = args.output or RESULTS / ("scale-quick.json" if args.quick else "scale.json")
    source = source_revision(tuneserve.__file__)
    started = time.monotonic()

    if _harness("postgres").find_bindir() is None:
        _log(
            "PostgreSQL's server binaries (initdb, pg_ctl) were not found in "
            "/usr/lib/postgresql/*/bin or on PATH: run `make postgresql` first"
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        pg = _harness("postgres").postgres_server()
        s3 = _harness("s3server").start_s3_server()
        try:
            _log(f"PostgreSQL on port {pg.port}, S3 at {s3.url}")
            claims = measure_claims(s, pg, work, s.claim_repeats)
            shape = ModelShape()
            model, tokenizer, n_params = build_model_dir(work / "model", shape, seed=s.seed)
            adapter_bytes = make_adapter(model, work / "imports" / "lora", s.lora_r, s.seed)
            rows = make_rows(PROMPTS, tokenizer, mix=LengthMix(long_fraction=0.0), seed=s.seed)
            db_url = pg.create_database()
            h = Harness(
                settings=s,
                work=work,
                model=model,
                adapter=work / "imports" / "lora",
                adapter_bytes=adapter_bytes,
                prompts=[r["prompt"] for r in rows],
                pg=pg,
                s3=s3,
                db_url=db_url,
                bucket=s3.make_bucket("bench-scale"),
            )
            _log(
                f"model {n_params / 1e6:.2f}M parameters; adapter r={s.lora_r} on every "
                f"linear layer, {adapter_bytes / 1024:.0f} KiB"
            )
            tenants = [f"tenant-{i:02d}" for i in range(s.adapters)]
            cold = measure_cold_load(h, tenants)
            routing = measure_routing(h, tenants, s.routing_repeats)
            pg.drop_database(db_url)
        finally:
            s3.stop()
            pg.destroy()

    report = summarise(claims, cold, routing)
    results = {
        "benchmark": "scale",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": environment(torch.device("cpu")),
        "source": source,
        "quick": args.quick,
        "repeats": {"claims": s.claim_repeats, "routing": s.routing_repeats},
        "seconds": time.monotonic() - started,
        **report,
        "model": {**shape.as_dict(), "vocab_size": len(tokenizer), "parameters": n_params},
        "workload": {
            "claims": {"jobs": s.claim_jobs, "workers": list(s.claim_workers)},
            "cold_load": {
                "adapters": s.cold_adapters,
                "adapter_bytes": adapter_bytes,
                "lora_r": s.lora_r,
                "max_new_tokens": s.max_new_tokens,
                "job_store": "postgresql (both replicas)",
            },
            "routing": {
                "replicas": list(ROLES),
                "policies": {p: POLICIES[p][0] for p in s.policies},
                "adapters": s.adapters,
                "requests": s.requests,
                "clients": s.clients,
                "zipf_s": s.zipf_s,
                "max_loaded_adapters": s.max_loaded_adapters,
                "max_new_tokens": s.max_new_tokens,
                "prompts": PROMPTS,
                "decoding": "greedy",
                "job_store": "postgresql",
                "artifact_store": "s3",
            },
            "replica_torch_threads": s.replica_threads,
            "seed": s.seed,
        },
        "runs": {"claims": claims, "cold_load": cold, "routing": routing},
    }
    write_json(output, results)
    print(table(report))
    print(f"\nwrote {output} ({results['seconds']:.0f} s)")
    return 0


def _harness(module: str) -> Any:
    """A module of the test suite's harness (run from the repository's root, as make does)."""
    return importlib.import_module(f"tests.{module}")


def _rotated(items: Sequence[str], repeat: int) -> list[str]:
    k = repeat % len(items)
    return [*items[k:], *items[:k]]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
