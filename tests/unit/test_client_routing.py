"""Adapter-aware routing in the clients (tuneserve_client.routing and clients/node): the
rendezvous ranking, homes, in-flight accounting, spill-over, cool-downs, DNS targets, the
RoutedClient over fake gRPC servers on port 0, and the Node client ranking as Python does."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tuneserve_client import ClientError, RetryPolicy, RoutedClient, Router, RoutingPolicy
from tuneserve_client.routing import parse_target, rank_replicas, score
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
REPLICAS = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]
ADAPTERS = [f"adapter-{i}" for i in range(30)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- ranking


def test_rank_is_deterministic_and_a_permutation() -> None:
    for adapter in ADAPTERS:
        ranked = rank_replicas(adapter, REPLICAS)
        assert sorted(ranked) == sorted(REPLICAS)
        assert rank_replicas(adapter, list(reversed(REPLICAS))) == ranked
        assert Router(REPLICAS).rank(adapter) == ranked
        assert [score(adapter, a) for a in ranked] == sorted(
            (score(adapter, a) for a in REPLICAS), reverse=True
        )
    # Different adapters get different orders: not one fixed order for all.
    assert len({tuple(rank_replicas(a, REPLICAS)) for a in ADAPTERS}) >= 4


def test_home_sets_are_balanced_over_30_adapters_and_3_replicas() -> None:
    router = Router(REPLICAS)
    homes = Counter(a for adapter in ADAPTERS for a in router.home(adapter))
    firsts = Counter(router.rank(adapter)[0] for adapter in ADAPTERS)
    assert sum(homes.values()) == 60  # two replicas per adapter
    assert set(homes) == set(firsts) == set(REPLICAS)
    # A fair share is 20 homes and 10 first places each; rendezvous hashing keeps every
    # replica within a few of it (these counts are fixed by the names, not random per run).
    assert all(14 <= n <= 26 for n in homes.values()), homes
    assert all(5 <= n <= 15 for n in firsts.values()), firsts


def test_removing_a_replica_moves_only_the_adapters_it_was_home_for() -> None:
    before = Router(REPLICAS)
    gone = REPLICAS[1]
    after = Router([a for a in REPLICAS if a != gone])
    moved = 0
    for adapter in ADAPTERS:
        old_rank = before.rank(adapter)
        assert after.rank(adapter) == [a for a in old_rank if a != gone]
        if gone in before.home(adapter):
            moved += 1
            assert after.home(adapter) == [a for a in old_rank if a != gone][:2]
        else:
            assert after.home(adapter) == before.home(adapter)
    assert 0 < moved < len(ADAPTERS)

    # The same through update(): counts and down marks of the replicas that stay are kept.
    router = Router(REPLICAS)
    address = router.acquire("adapter-0")
    added, removed = router.update([*REPLICAS, "10.0.0.4:50051"])
    assert (added, removed) == ({"10.0.0.4:50051"}, set())
    assert router.in_flight(address) == 1


# --- picking


def test_picks_the_less_loaded_home_replica() -> None:
    router = Router(REPLICAS)
    first, second, third = router.rank("adapter-7")
    assert router.pick("adapter-7") == first  # ties go to the higher ranked
    with router.route("adapter-7") as address:
        assert address == first
        assert router.in_flight(first) == 1
        assert router.pick("adapter-7") == second
        with router.route("adapter-7") as again:
            assert again == second
            assert router.pick("adapter-7") == first  # 1 and 1: rank breaks the tie
    assert router.in_flight(first) == router.in_flight(second) == 0
    assert third not in router.home("adapter-7")


def test_spills_in_rank_order_when_every_home_replica_is_full() -> None:
    router = Router(REPLICAS, policy=RoutingPolicy(max_in_flight_per_replica=2))
    first, second, third = router.rank("adapter-3")
    picks = [router.acquire("adapter-3") for _ in range(6)]
    assert picks == [first, second, first, second, third, third]
    # Everything full: the least loaded takes it (rank breaks ties).
    assert router.acquire("adapter-3") == first
    router.release(second)
    assert router.pick("adapter-3") == second  # room at home again: no more spilling
    # Another adapter with the same replicas at home spills to its own next replica.
    other = next(a for a in ADAPTERS if router.rank(a)[2] != third)
    assert router.pick(other) == min(REPLICAS, key=router.in_flight)


def test_mark_down_skips_a_replica_for_the_cool_down_then_it_returns() -> None:
    clock = Clock()
    router = Router(REPLICAS, policy=RoutingPolicy(cooldown_s=5.0), clock=clock)
    first, second, third = router.rank("adapter-1")
    router.mark_down(first)
    assert router.is_down(first)
    assert router.pick("adapter-1") == second
    assert router.home("adapter-1") == [second, third]  # the next in rank stands in
    assert first not in {router.pick("") for _ in range(6)}
    clock.now += 4.9
    assert router.pick("adapter-1") == second
    clock.now += 0.2
    assert not router.is_down(first)
    assert router.pick("adapter-1") == first
    # Every replica down: they are all tried anyway, best first.
    for address in REPLICAS:
        router.mark_down(address)
    assert router.pick("adapter-1") == first


def test_base_model_calls_go_to_the_least_loaded_replica_in_turn() -> None:
    router = Router(REPLICAS)
    assert Counter(router.pick("") for _ in range(9)) == {a: 3 for a in REPLICAS}
    held = [router.acquire(""), router.acquire("")]
    assert len(set(held)) == 2
    idle = next(a for a in REPLICAS if a not in held)
    assert router.pick("") == idle
    # affinity off: adapters are routed the same way (the round-robin baseline).
    baseline = Router(REPLICAS, policy=RoutingPolicy(affinity=False))
    assert Counter(baseline.pick("adapter-1") for _ in range(9)) == {a: 3 for a in REPLICAS}


def test_exclude_and_an_empty_router() -> None:
    router = Router(REPLICAS)
    first, second, _ = router.rank("adapter-2")
    assert router.pick("adapter-2", exclude={first}) == second
    with pytest.raises(LookupError):
        router.pick("adapter-2", exclude=REPLICAS)
    with pytest.raises(LookupError):
        Router().pick("")


# --- targets and DNS


def test_parse_target() -> None:
    assert parse_target("h1:50051, h2:50051") == (["h1:50051", "h2:50051"], None)
    assert parse_target(["h1:1", "h2:2"]) == (["h1:1", "h2:2"], None)
    assert parse_target("dns:///svc.ns.svc:50051") == ([], ("svc.ns.svc", 50051))
    assert parse_target("dns:svc:7") == ([], ("svc", 7))
    assert parse_target("dns:///[::1]:7") == ([], ("::1", 7))
    for bad in ("dns:///svc", "dns://8.8.8.8/svc:1"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_dns_target_is_resolved_and_refreshed_keeping_channels_that_stay() -> None:
    answers: list[list[str] | OSError] = [
        ["10.1.0.1:50051", "10.1.0.2:50051"],
        ["10.1.0.2:50051", "10.1.0.3:50051"],
        OSError("temporary failure in name resolution"),
        [],
    ]
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    with RoutedClient(
        "dns:///tuneserve-serve-headless.tuneserve.svc:50051",
        resolver=resolver,
        resolve_interval_s=0,
    ) as client:
        assert asked == [("tuneserve-serve-headless.tuneserve.svc", 50051)]
        assert client.addresses == ("10.1.0.1:50051", "10.1.0.2:50051")
        kept = client._client("10.1.0.2:50051")
        client.refresh()
        assert client.addresses == ("10.1.0.2:50051", "10.1.0.3:50051")
        assert client._client("10.1.0.2:50051") is kept  # the channel that stays is kept
        assert client._client("10.1.0.1:50051") is None
        client.refresh()  # resolution failed: keep what there is
        client.refresh()  # resolved to nothing: the same
        assert client.addresses == ("10.1.0.2:50051", "10.1.0.3:50051")


def test_dns_target_is_resolved_again_every_interval() -> None:
    calls = threading.Semaphore(0)

    def resolver(host: str, port: int) -> list[str]:
        calls.release()
        return [f"10.2.0.1:{port}"]

    with RoutedClient("dns:svc:9", resolver=resolver, resolve_interval_s=0.05):
        for _ in range(3):  # the first at start, then on the timer
            assert calls.acquire(timeout=5)


# --- the RoutedClient over fake servers


@dataclass
class FakeReplica(pb_grpc.TuneserveServiceServicer):
    """A servicer that records the calls it answers; fails with `fail` when set, and holds
    Generate calls while `hold` is clear."""

    fail: grpc.StatusCode | None = None
    calls: list[tuple[str, Any]] = field(default_factory=list)
    hold: threading.Event = field(default_factory=lambda: _set(threading.Event()))
    arrived: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def _answer(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        self.calls.append((method, request))
        if self.fail is not None:
            context.abort(self.fail, "scripted")
        self.arrived.release()
        self.hold.wait(10)

    def Generate(self, request: Any, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self._answer("Generate", request, context)
        return pb.GenerateResponse(text=request.adapter_id)

    def GenerateStream(
        self, request: Any, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        self._answer("GenerateStream", request, context)
        yield pb.GenerateStreamResponse(text="a")
        yield pb.GenerateStreamResponse(text="b")

    def TrainJob(self, request: Any, context: grpc.ServicerContext) -> pb.TrainJobResponse:
        self._answer("TrainJob", request, context)
        return pb.TrainJobResponse(job=pb.Job(id="j", request_id=request.request_id))

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> pb.GetStatusResponse:
        self._answer("GetStatus", request, context)
        return pb.GetStatusResponse(job=pb.Job(id=request.job_id))

    def LoadAdapter(self, request: Any, context: grpc.ServicerContext) -> pb.LoadAdapterResponse:
        self._answer("LoadAdapter", request, context)
        return pb.LoadAdapterResponse(adapter=pb.Adapter(id=request.adapter_id))

    def ListJobs(self, request: Any, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        self._answer("ListJobs", request, context)
        if request.page_token:
            return pb.ListJobsResponse(jobs=[pb.Job(id="j2")])
        return pb.ListJobsResponse(jobs=[pb.Job(id="j1")], next_page_token="2")


def _set(event: threading.Event) -> threading.Event:
    event.set()
    return event


@pytest.fixture
def replicas() -> Iterator[dict[str, FakeReplica]]:
    """Three fake replicas on port 0, by address."""
    started: dict[str, FakeReplica] = {}
    servers = []
    for _ in range(3):
        fake = FakeReplica()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_TuneserveServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        started[f"127.0.0.1:{port}"] = fake
    yield started
    for fake in started.values():
        fake.hold.set()
    for server in servers:
        server.stop(0)


FAST = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.02, max_elapsed_s=5)


def served(replicas: dict[str, FakeReplica], method: str) -> dict[str, int]:
    return {a: sum(m == method for m, _ in fake.calls) for a, fake in replicas.items()}


def test_generation_goes_to_the_adapter_home_and_the_rest_round_robin(
    replicas: dict[str, FakeReplica],
) -> None:
    with RoutedClient(",".join(replicas), retry=FAST) as client:
        first = client.router.rank("adapter-5")[0]
        for _ in range(4):
            assert client.generate("hi", adapter_id="adapter-5").text == "adapter-5"
        assert [c.text for c in client.generate_stream("hi", adapter_id="adapter-5")] == ["a", "b"]
        assert served(replicas, "Generate")[first] == 4
        assert served(replicas, "GenerateStream")[first] == 1
        for i in range(6):
            client.get_status(f"j{i}")
        assert set(served(replicas, "GetStatus").values()) == {2}
        assert [j.id for j in client.list_jobs()] == ["j1", "j2"]  # both pages on one replica
        assert sorted(served(replicas, "ListJobs").values()) == [0, 0, 2]
        client.load_adapter("adapter-5", pin=True)  # on each home replica
        loads = served(replicas, "LoadAdapter")
        assert {a for a, n in loads.items() if n} == set(client.router.home("adapter-5"))
        assert all(client.router.in_flight(a) == 0 for a in replicas)


def test_concurrent_calls_fill_the_home_then_spill_in_rank_order(
    replicas: dict[str, FakeReplica],
) -> None:
    for fake in replicas.values():
        fake.hold.clear()
    policy = RoutingPolicy(max_in_flight_per_replica=1)
    with (
        RoutedClient(list(replicas), routing=policy, retry=FAST) as client,
        futures.ThreadPoolExecutor(4) as pool,
    ):
        ranked = client.router.rank("adapter-9")
        calls = []
        for expected in ranked:
            calls.append(pool.submit(client.generate, "hi", adapter_id="adapter-9"))
            assert replicas[expected].arrived.acquire(timeout=5)  # arrived where it should
            assert client.router.in_flight(expected) == 1
        for fake in replicas.values():
            fake.hold.set()
        assert [c.result(10).text for c in calls] == ["adapter-9"] * 3
        assert served(replicas, "Generate") == {a: 1 for a in replicas}


def test_unavailable_replica_is_skipped_and_the_call_succeeds_on_the_next(
    replicas: dict[str, FakeReplica],
) -> None:
    with RoutedClient(list(replicas), retry=FAST) as client:
        first, second, _ = client.router.rank("adapter-4")
        replicas[first].fail = grpc.StatusCode.UNAVAILABLE
        assert client.generate("hi", adapter_id="adapter-4").text == "adapter-4"
        assert client.router.is_down(first)
        for _ in range(3):
            client.generate("hi", adapter_id="adapter-4")
        assert served(replicas, "Generate")[first] == 1  # tried once, then skipped
        assert served(replicas, "Generate")[second] == 4
        # A stream fails over the same way before its first message.
        client.router.update([])
        client.router.update(replicas)  # forget the down mark
        chunks = [c.text for c in client.generate_stream("hi", adapter_id="adapter-4")]
        assert chunks == ["a", "b"]
        assert served(replicas, "GenerateStream") == {
            a: int(a in (first, second)) for a in replicas
        }


def test_a_train_tried_on_every_replica_sends_one_request_id(
    replicas: dict[str, FakeReplica],
) -> None:
    with RoutedClient(list(replicas), retry=FAST) as client:
        for fake in replicas.values():
            fake.fail = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ClientError):
            client.train(rows=[{"text": "hi"}], adapter_id="a", request_id="")
        trains = [r for fake in replicas.values() for m, r in fake.calls if m == "TrainJob"]
        assert len(trains) == FAST.max_attempts
        assert len({r.request_id for r in trains}) == 1
        assert set(served(replicas, "TrainJob").values()) >= {1, 2}  # every replica tried


def test_answers_are_not_retried_and_all_down_gives_up(replicas: dict[str, FakeReplica]) -> None:
    with RoutedClient(list(replicas), retry=FAST) as client:
        home = client.router.rank("adapter-6")[0]
        replicas[home].fail = grpc.StatusCode.NOT_FOUND
        with pytest.raises(ClientError) as e:
            client.generate("hi", adapter_id="adapter-6")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert sum(served(replicas, "Generate").values()) == 1
        for fake in replicas.values():
            fake.fail = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ClientError) as e:
            client.generate("hi", adapter_id="adapter-6")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert sum(served(replicas, "Generate").values()) == 1 + FAST.max_attempts
        assert all(client.router.in_flight(a) == 0 for a in replicas)


# --- the Node.js client ranks and picks as this one does

NODE_SCENARIO = """
const t = require('./tuneserve');
const s = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const ranks = Object.fromEntries(s.adapters.map((a) => [a, t.rankReplicas(a, s.replicas)]));
const scores = s.adapters.map((a) => t.rendezvousScore(a, s.replicas[0]).toString());
const router = new t.Router(s.replicas, { maxInFlightPerReplica: 2 });
const picks = s.ops.map(([op, arg]) => {
  if (op === 'down') return router.markDown(arg), null;
  if (op === 'release') return router.release(arg), null;
  return router.acquire(arg);
});
console.log(JSON.stringify({ ranks, scores, picks }));
"""


@pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_CLIENT / "node_modules" / "@grpc").is_dir(),
    reason="needs node and clients/node's node_modules (make setup)",
)
def test_the_node_client_ranks_and_picks_as_python_does() -> None:
    adapters = [*ADAPTERS[:10], "", "ünïcode-adapter", "a" * 64]
    replicas = [*REPLICAS, "[fd00::1]:50051", "tuneserve-0.svc:50051"]
    ops: list[tuple[str, str]] = [("acquire", "adapter-1")] * 7 + [("acquire", "")] * 4
    ops += [("down", replicas[0]), ("release", replicas[1])]
    ops += [("acquire", a) for a in ADAPTERS[:10]]
    result = subprocess.run(
        ["node", "-e", NODE_SCENARIO],
        input=json.dumps({"adapters": adapters, "replicas": replicas, "ops": ops}),
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    node = json.loads(result.stdout)
    assert node["ranks"] == {a: rank_replicas(a, replicas) for a in adapters}
    assert node["scores"] == [str(score(a, replicas[0])) for a in adapters]

    router = Router(replicas, policy=RoutingPolicy(max_in_flight_per_replica=2))
    picks: list[str | None] = []
    for op, arg in ops:
        if op == "down":
            router.mark_down(arg)
        elif op == "release":
            router.release(arg)
        picks.append(router.acquire(arg) if op == "acquire" else None)
    assert node["picks"] == picks
