"""End to end: the RoutedClient over three real servers on port 0.

Until the shared store lands, separate servers do not share adapters, so each server here
imports the same LoRA weights under the same names (what the shared store will give every
replica). What the tests show, from each server's own /metrics and ListAdapters: requests
for an adapter are served by its home replicas and load it only there; base-model calls
and the affinity-off baseline spread over every replica; a stopped replica is skipped and
the calls still succeed; the Node.js RoutedClient sends each adapter where Python's would."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT, ServerThread, make_config
from tuneserve.models import load_model
from tuneserve_client import RetryPolicy, RoutedClient, RoutingPolicy, TuneserveClient
from tuneserve_client.routing import rank_replicas

pytestmark = pytest.mark.e2e

ADAPTERS = [f"tenant-{i}" for i in range(6)]
PROMPT = "Question: Who are you? Answer:"
FAST = RetryPolicy(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.2, max_elapsed_s=20)


@pytest.fixture
def cluster(
    tiny_gpt2: Path, tmp_path: Path, server_factory: Callable[..., ServerThread]
) -> Iterator[dict[str, ServerThread]]:
    """Three servers by address, each holding the same LoRA weights as every ADAPTER."""
    imports = tmp_path / "imports"
    torch.manual_seed(1)
    base = load_model(str(tiny_gpt2), device=torch.device("cpu"), dtype=torch.float32)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"])
    get_peft_model(base, config).save_pretrained(imports / "lora")
    servers = {}
    for i in range(3):
        data = tmp_path / f"replica{i}"
        server = server_factory(make_config(tiny_gpt2, data, adapter_import_roots=(imports,)))
        with TuneserveClient(server.target) as client:
            for adapter in ADAPTERS:
                client.import_adapter(str(imports / "lora"), adapter)
        servers[server.target] = server
    yield servers


def generations(server: ServerThread) -> float:
    """Generation requests the server finished, from its /metrics."""
    url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tuneserve_generation_requests_total"
    )


def served_since(servers: dict[str, ServerThread], before: dict[str, float], total: int) -> dict:
    """Generations each server finished since `before`, once they add up to `total` (a
    request is counted a moment after its answer may reach the client)."""
    deadline = time.monotonic() + 10
    while True:
        now = {a: generations(s) - before[a] for a, s in servers.items()}
        if sum(now.values()) >= total or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def loaded_on(servers: dict[str, ServerThread], adapter: str) -> set[str]:
    found = set()
    for address in servers:
        with TuneserveClient(address) as client:
            if client.get_adapter(adapter).loaded:
                found.add(address)
    return found


def test_generation_for_an_adapter_is_served_and_loaded_only_by_its_home_replicas(
    cluster: dict[str, ServerThread],
) -> None:
    before = {a: generations(s) for a, s in cluster.items()}
    assert all(not loaded_on(cluster, adapter) for adapter in ADAPTERS)  # imports load nothing
    with RoutedClient(",".join(cluster), retry=FAST) as client:
        for adapter in ADAPTERS:
            for seed in range(3):
                client.generate(PROMPT, adapter_id=adapter, max_new_tokens=4, seed=seed)
        # One at a time, each adapter stays on the first replica of its rank.
        expected = {a: 0 for a in cluster}
        for adapter in ADAPTERS:
            expected[client.router.rank(adapter)[0]] += 3
        assert served_since(cluster, before, 18) == expected
        for adapter in ADAPTERS:
            assert loaded_on(cluster, adapter) == {client.router.rank(adapter)[0]}

        # Eight at a time for one adapter: both home replicas serve it (the less loaded
        # takes each call; under eight in flight each, so nothing spills), the third never
        # sees it.
        adapter = ADAPTERS[0]
        home = client.router.home(adapter)
        before = {a: generations(s) for a, s in cluster.items()}
        with futures.ThreadPoolExecutor(8) as pool:
            calls = [
                pool.submit(client.generate, PROMPT, adapter_id=adapter, max_new_tokens=16, seed=i)
                for i in range(48)
            ]
            for call in calls:
                call.result(60)
        served = served_since(cluster, before, 48)
        assert sum(served.values()) == 48
        assert {a for a, n in served.items() if n} == set(home)
        assert loaded_on(cluster, adapter) == set(home)


def test_base_model_calls_and_the_affinity_off_baseline_spread_over_every_replica(
    cluster: dict[str, ServerThread],
) -> None:
    before = {a: generations(s) for a, s in cluster.items()}
    with RoutedClient(list(cluster), retry=FAST) as client:
        for seed in range(9):
            client.generate(PROMPT, max_new_tokens=4, seed=seed)
        for _ in range(6):
            assert client.list_adapters()  # calls with no adapter go round the replicas too
            client.wait_ready(timeout=5)
    assert served_since(cluster, before, 9) == {a: 3 for a in cluster}

    before = {a: generations(s) for a, s in cluster.items()}
    baseline = RoutingPolicy(affinity=False)
    with RoutedClient(list(cluster), routing=baseline, retry=FAST) as client:
        for seed in range(9):
            client.generate(PROMPT, adapter_id=ADAPTERS[1], max_new_tokens=4, seed=seed)
    assert served_since(cluster, before, 9) == {a: 3 for a in cluster}
    assert loaded_on(cluster, ADAPTERS[1]) == set(cluster)  # every replica had to load it


def test_a_stopped_replica_is_skipped_and_calls_still_succeed(
    cluster: dict[str, ServerThread],
) -> None:
    adapter = ADAPTERS[2]
    with RoutedClient(list(cluster), retry=FAST) as client:
        first, second, third = client.router.rank(adapter)
        client.generate(PROMPT, adapter_id=adapter, max_new_tokens=4)  # a channel to each
        cluster[first].stop()
        live = {a: cluster[a] for a in (second, third)}
        before = {a: generations(s) for a, s in live.items()}
        started = time.monotonic()
        for seed in range(5):
            reply = client.generate(PROMPT, adapter_id=adapter, max_new_tokens=4, seed=seed)
            assert reply.generated_tokens > 0
        for seed in range(4):
            client.generate(PROMPT, max_new_tokens=4, seed=seed)
        assert time.monotonic() - started < 10  # failed over at once, not after backoffs
        assert client.router.is_down(first)
        # The adapter moved to the next replica in its rank; base calls went round the two.
        assert served_since(live, before, 9) == {second: 5 + 2, third: 2}


NODE_GENERATE = """
const { RoutedClient } = require('./tuneserve');
const [targets, adapters] = JSON.parse(process.argv[1]);
(async () => {
  const client = new RoutedClient(targets, { maxAttempts: 4 });
  const out = [];
  for (const adapter_id of adapters) {
    const parameters = { max_new_tokens: 4, greedy: true };
    const request = { prompt: 'Question: Who are you? Answer:', adapter_id, parameters };
    const reply = await client.generate(request);
    let text = '';
    for await (const chunk of client.generateStream(request)) {
      text += chunk.text;
    }
    out.push([reply.generated_tokens > 0, text.length > 0]);
  }
  console.log(JSON.stringify(out));
  client.close();
})().catch((error) => { console.error(error); process.exit(1); });
"""


@pytest.mark.skipif(
    shutil.which("node") is None
    or not (ROOT / "clients" / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir(),
    reason="needs node and clients/node's node_modules (make setup)",
)
def test_the_node_client_sends_each_adapter_where_python_would(
    cluster: dict[str, ServerThread],
) -> None:
    # A fourth address where nothing listens, ranked first by the first adapter: its calls
    # fail over to the next replica in its rank.
    adapters = ADAPTERS[:4]
    dead = next(
        address
        # Loopback addresses on ports nothing listens on (refused at once), over many
        # hosts: one replica's score can be so high that none of 1,023 ports beat it.
        for address in (
            f"127.0.{host // 256}.{host % 256}:{port}"
            for host in range(1, 65536)
            for port in range(1, 1024, 97)
        )
        if rank_replicas(adapters[0], [*cluster, address])[0] == address
    )
    targets = [*cluster, dead]
    before = {a: generations(s) for a, s in cluster.items()}
    done = subprocess.run(
        ["node", "-e", NODE_GENERATE, json.dumps([targets, adapters])],
        cwd=ROOT / "clients" / "node",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[True, True]] * len(adapters)
    expected = {a: 0 for a in cluster}
    for adapter in adapters:
        expected[next(a for a in rank_replicas(adapter, targets) if a in cluster)] += 2
    assert served_since(cluster, before, 2 * len(adapters)) == expected
