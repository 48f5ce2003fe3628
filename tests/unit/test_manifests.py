"""k8s/: what a platform engineer relies on in the rendered manifests, checked on what
`kubectl kustomize` renders for the base and every overlay (schemas and policy checks are
`make deploy-lint`'s; these are tuneserve's own invariants): one GPU per pod, probes on the
plaintext health port the server is told to open, a grace period longer than the drain, a
locked-down pod, shared memory in RAM, a headless gRPC Service, and settings the server
accepts. The single-pod targets keep one writer on a ReadWriteOnce volume; the scale overlay
runs serving and training Deployments on PostgreSQL and object storage, behind PDBs and
autoscalers, with credentials only from Secrets."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tuneserve.config import ENV_PREFIX, ServerConfig, load_config

K8S = Path(__file__).resolve().parents[2] / "k8s"
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl")
# The targets that run one pod, its SQLite job store on a ReadWriteOnce volume.
SINGLE = ["base", "overlays/gpu", "overlays/tls"]
SCALE = "overlays/scale"
TARGETS = [*SINGLE, SCALE]
# Every Deployment of every target, as (target, name).
WORKLOADS = [(t, "tuneserve") for t in SINGLE] + [
    (SCALE, "tuneserve-serve"),
    (SCALE, "tuneserve-train"),
]
UID = 10001
# A job interrupted by SIGTERM checkpoints after the drain; it needs this much on top.
CHECKPOINT_MARGIN_S = 60
# Settings that name files or directories inside the pod: checked against the mounts, not
# loaded here (the validation would look for them on this machine).
POD_PATHS = {
    "TUNESERVE_DATA_DIR",
    "TUNESERVE_DATASET_ROOTS",
    "TUNESERVE_ADAPTER_IMPORT_ROOTS",
    "TUNESERVE_TLS_CERT_FILE",
    "TUNESERVE_TLS_KEY_FILE",
    "TUNESERVE_TLS_CLIENT_CA_FILE",
    "TUNESERVE_AUTH_TOKENS_FILE",
}
# What a setting taken from the pod's own fields (the downward API) stands for here.
FIELD_SAMPLES = {"metadata.name": "tuneserve-serve-5d9c7b8f4-x2x7q"}
# The Secrets the scale overlay references by name, and what each provides.
SCALE_SECRETS = {
    "tuneserve-postgres": {"PGPASSWORD"},
    "tuneserve-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
}
# Names of variables that hold a credential (PGPASSWORD, AWS_SECRET_ACCESS_KEY, ...).
CREDENTIAL = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|SESSION_TOKEN", re.IGNORECASE)
PROMETHEUS_ADAPTER = K8S / "overlays/scale/prometheus-adapter.values.yaml"

pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (it renders k8s/ with kustomize)"
)


class Rendered:
    def __init__(self, target: str) -> None:
        assert KUBECTL is not None
        out = subprocess.run(
            [KUBECTL, "kustomize", str(K8S / target)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        self.text = out
        self.objects = [o for o in yaml.safe_load_all(out) if o]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def autoscaler(self, deployment: str) -> dict[str, Any]:
        """The HorizontalPodAutoscaler that sizes the Deployment."""
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment}
        (hpa,) = [
            h for h in self.all("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"] == target
        ]
        return hpa

    @property
    def workloads(self) -> list[Workload]:
        return [Workload(self, d["metadata"]["name"]) for d in self.all("Deployment")]


@functools.cache
def render(target: str) -> Rendered:
    return Rendered(target)


@dataclasses.dataclass
class Workload:
    """One Deployment of a rendered target, with the objects it takes from the target."""

    rendered: Rendered
    name: str

    @property
    def deployment(self) -> dict[str, Any]:
        return self.rendered.one("Deployment", self.name)

    @property
    def labels(self) -> dict[str, str]:
        return self.deployment["spec"]["template"]["metadata"]["labels"]

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return container

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.container.get("env", [])}

    @property
    def settings(self) -> dict[str, str]:
        """The ConfigMap the container takes its environment from."""
        (source,) = self.container["envFrom"]
        return self.rendered.one("ConfigMap", source["configMapRef"]["name"])["data"]

    @property
    def role(self) -> str:
        return self.env.get("TUNESERVE_ROLE", {}).get("value") or self.settings.get(
            "TUNESERVE_ROLE", "all"
        )

    def selected_by(self, selector: dict[str, str]) -> bool:
        return selector.items() <= self.labels.items()

    def mounted_from(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The mount whose directory holds `path`, and its volume."""
        mounts = [
            m
            for m in self.container["volumeMounts"]
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert mounts, f"{path} is on no volume"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        (volume,) = [v for v in self.pod["volumes"] if v["name"] == mount["name"]]
        return mount, volume


def port(address: str) -> int:
    return int(address.rpartition(":")[2])


def quantity(value: str) -> int:
    """A Kubernetes quantity in bytes ("50Gi", "10G", "1024")."""
    units = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    units |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number = value.rstrip("".join(units))
    return int(number) * units[value[len(number) :]]


@pytest.fixture(scope="module", params=TARGETS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render(request.param)


@pytest.fixture(scope="module", params=WORKLOADS, ids=[f"{t}:{n}" for t, n in WORKLOADS])
def workload(request: pytest.FixtureRequest) -> Workload:
    target, name = request.param
    return Workload(render(target), name)


@pytest.fixture(scope="module", params=SINGLE)
def single(request: pytest.FixtureRequest) -> Workload:
    return Workload(render(request.param), "tuneserve")


@pytest.fixture(scope="module")
def tls() -> Workload:
    return Workload(render("overlays/tls"), "tuneserve")


@pytest.fixture(scope="module")
def scale() -> Rendered:
    return render(SCALE)


@pytest.fixture(scope="module")
def serve(scale: Rendered) -> Workload:
    return Workload(scale, "tuneserve-serve")


@pytest.fixture(scope="module")
def train(scale: Rendered) -> Workload:
    return Workload(scale, "tuneserve-train")


def test_every_target_runs_the_deployments_we_test() -> None:
    for target in TARGETS:
        names = {w.name for w in render(target).workloads}
        assert names == {n for t, n in WORKLOADS if t == target}, target


def test_each_pod_gets_one_gpu_on_a_gpu_node(workload: Workload) -> None:
    resources = workload.container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= resources["requests"].keys() & resources["limits"].keys()
    assert workload.settings["TUNESERVE_DEVICE"].startswith("cuda")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        workload.pod["tolerations"]
    )
    assert workload.pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    image = workload.container["image"]
    assert image != "tuneserve" and not image.endswith(":latest") and ":" in image


def test_one_pod_is_the_one_writer_of_its_volume(single: Workload) -> None:
    spec = single.deployment["spec"]
    # SQLite job store on a ReadWriteOnce volume: one writer, the old pod gone first.
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert single.role == "all"


def test_torch_threads_follow_the_cpu_limit(workload: Workload) -> None:
    field = workload.env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "limits.cpu"
    assert field["containerName"] == workload.container["name"]
    assert "cpu" in workload.container["resources"]["limits"]


def test_probes_call_grpc_health_on_the_plaintext_health_port(workload: Workload) -> None:
    health = port(workload.settings["TUNESERVE_HEALTH_LISTEN"])
    ports = {p["name"]: p["containerPort"] for p in workload.container["ports"]}
    assert ports == {
        "grpc": port(workload.settings["TUNESERVE_LISTEN"]),
        "health": health,
        "metrics": port(workload.settings["TUNESERVE_METRICS_LISTEN"]),
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert workload.container[probe]["grpc"] == {"port": health}, probe
    startup = workload.container["startupProbe"]
    # Loading (and downloading) a large model: at least ten minutes before the kubelet gives up.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_grace_period_covers_the_drain_and_a_checkpoint(workload: Workload) -> None:
    drain = float(workload.settings["TUNESERVE_GRACE_PERIOD_S"])
    assert workload.pod["terminationGracePeriodSeconds"] >= drain + CHECKPOINT_MARGIN_S


def test_the_pod_is_locked_down(workload: Workload) -> None:
    pod = workload.pod["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == UID
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    container = workload.container["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert workload.pod["automountServiceAccountToken"] is False
    account = workload.rendered.one("ServiceAccount", workload.pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    # Service links would add TUNESERVE_*_PORT variables to the settings' namespace.
    assert workload.pod["enableServiceLinks"] is False
    # A read-only root: the places the process writes to are volumes.
    for path in ("/tmp", workload.settings["TUNESERVE_DATA_DIR"], "/var/cache/tuneserve"):
        mount, _ = workload.mounted_from(path)
        assert not mount.get("readOnly"), path
    _, tmp = workload.mounted_from("/tmp")
    assert "sizeLimit" in tmp["emptyDir"]


def test_shared_memory_is_a_sized_memory_emptydir(workload: Workload) -> None:
    mount, volume = workload.mounted_from("/dev/shm")
    assert mount["mountPath"] == "/dev/shm"
    assert volume["emptyDir"]["medium"] == "Memory"
    assert volume["emptyDir"]["sizeLimit"]


def test_data_and_datasets_live_on_their_volumes(single: Workload) -> None:
    claims = {o["metadata"]["name"]: o for o in single.rendered.all("PersistentVolumeClaim")}
    _, data = single.mounted_from(single.settings["TUNESERVE_DATA_DIR"])
    assert claims[data["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]
    for root in single.settings["TUNESERVE_DATASET_ROOTS"].split(":"):
        mount, volume = single.mounted_from(root)
        assert mount["readOnly"] is True
        assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_grpc_service_is_headless_and_metrics_are_scraped(rendered: Rendered) -> None:
    # Generation goes to pods of role all or serve; a training pod serves none.
    servers = [w for w in rendered.workloads if w.role != "train"]
    trainers = [w for w in rendered.workloads if w.role == "train"]
    assert servers
    grpc = rendered.one("Service", "tuneserve")["spec"]
    assert grpc["clusterIP"] == "None"
    assert all(w.selected_by(grpc["selector"]) for w in servers)
    assert not any(w.selected_by(grpc["selector"]) for w in trainers)
    (grpc_port,) = grpc["ports"]
    assert grpc_port["name"] == "grpc" and grpc_port["appProtocol"] == "grpc"
    assert grpc_port["targetPort"] == "grpc"

    # Every pod, whatever its role, is scraped and admitted by the NetworkPolicy.
    metrics = rendered.one("Service", "tuneserve-metrics")
    assert all(w.selected_by(metrics["spec"]["selector"]) for w in rendered.workloads)
    (metrics_port,) = metrics["spec"]["ports"]
    assert metrics_port["name"] == "metrics"
    monitor = rendered.one("ServiceMonitor", "tuneserve")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    policy = rendered.one("NetworkPolicy", "tuneserve")["spec"]
    assert all(w.selected_by(policy["podSelector"]["matchLabels"]) for w in rendered.workloads)
    dashboard = rendered.one("ConfigMap", "tuneserve-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_settings_are_ones_the_server_accepts(workload: Workload) -> None:
    # Other keys (HF_HUB_OFFLINE, AWS_REGION, PGPASSWORD) are the environment's; ours must
    # name real settings, whether from the ConfigMap or the container's own env.
    settings = {k: v for k, v in workload.settings.items() if k.startswith(ENV_PREFIX)}
    for name, var in workload.env.items():
        if name.startswith(ENV_PREFIX):
            if "value" in var:
                settings[name] = var["value"]
            else:
                settings[name] = FIELD_SAMPLES[var["valueFrom"]["fieldRef"]["fieldPath"]]
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServerConfig)}
    assert settings.keys() <= known, f"unknown settings: {sorted(settings.keys() - known)}"
    config = load_config(env={k: v for k, v in settings.items() if k not in POD_PATHS})
    assert config.health_listen and config.log_format == "json"


def test_tls_overlay_mounts_what_the_settings_name(tls: Workload) -> None:
    settings = tls.settings
    # No key material in the repository: the Secrets are referenced, never rendered.
    assert not tls.rendered.all("Secret")
    secrets: dict[str, set[str]] = {}
    for name in (
        "TUNESERVE_TLS_CERT_FILE",
        "TUNESERVE_TLS_KEY_FILE",
        "TUNESERVE_TLS_CLIENT_CA_FILE",  # set: mutual TLS
        "TUNESERVE_AUTH_TOKENS_FILE",
    ):
        path = settings[name]
        mount, volume = tls.mounted_from(path)
        assert mount["readOnly"] is True
        relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
        if "secret" in volume:
            sources = [{"name": volume["secret"]["secretName"], **volume["secret"]}]
        else:
            sources = [s["secret"] for s in volume["projected"]["sources"]]
        (source,) = [s for s in sources if relative in {i["path"] for i in s["items"]}]
        secrets.setdefault(source["name"], set()).add(relative)
    assert secrets == {
        "tuneserve-tls": {"tls.crt", "tls.key"},
        "tuneserve-client-ca": {"client-ca.crt"},
        "tuneserve-auth-tokens": {"tokens"},
    }
    # The probes stay on plaintext health while the main port speaks TLS.
    assert settings["TUNESERVE_HEALTH_LISTEN"]


# The scale overlay: many pods on shared state.


def test_scale_roles_and_replica_identity(serve: Workload, train: Workload) -> None:
    assert (serve.role, train.role) == ("serve", "train")
    assert not serve.selected_by(train.deployment["spec"]["selector"]["matchLabels"])
    assert not train.selected_by(serve.deployment["spec"]["selector"]["matchLabels"])
    for workload in (serve, train):
        # The identity that holds job leases: the pod's own name, unique per replica.
        replica = workload.env["TUNESERVE_REPLICA_ID"]["valueFrom"]["fieldRef"]
        assert replica["fieldPath"] == "metadata.name"
        settings = workload.settings
        assert urlsplit(settings["TUNESERVE_JOB_STORE"]).scheme == "postgresql"
        assert urlsplit(settings["TUNESERVE_ARTIFACT_STORE"]).scheme == "s3"
        assert float(settings["TUNESERVE_LEASE_S"]) > 0


def test_scale_serving_pods_roll_one_at_a_time(
    scale: Rendered, serve: Workload, train: Workload
) -> None:
    spec = serve.deployment["spec"]
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1},
    }
    # The autoscaler owns the count: a replicas field would be re-applied over it.
    assert "replicas" not in spec
    hpa = scale.autoscaler(serve.name)
    assert hpa["spec"]["minReplicas"] > 1
    # Clients that route by adapter resolve this headless Service to the serving pods.
    routing = scale.one("Service", "tuneserve-serve-headless")["spec"]
    assert routing["clusterIP"] == "None"
    assert serve.selected_by(routing["selector"]) and not train.selected_by(routing["selector"])
    (routing_port,) = routing["ports"]
    assert routing_port["port"] == port(serve.settings["TUNESERVE_LISTEN"])
    assert routing_port["targetPort"] == "grpc"


def test_scale_each_deployment_has_a_pdb_allowing_one_down(scale: Rendered) -> None:
    budgets = scale.all("PodDisruptionBudget")
    for workload in scale.workloads:
        (budget,) = [
            b for b in budgets if workload.selected_by(b["spec"]["selector"]["matchLabels"])
        ]
        assert budget["spec"]["maxUnavailable"] == 1
        assert "minAvailable" not in budget["spec"]
    assert len(budgets) == len(scale.workloads)


def test_scale_training_pods_have_time_to_checkpoint(serve: Workload, train: Workload) -> None:
    assert train.deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "replicas" not in train.deployment["spec"]
    # The checkpoint now also goes up to object storage.
    grace = train.pod["terminationGracePeriodSeconds"]
    assert grace >= serve.pod["terminationGracePeriodSeconds"]
    assert grace >= float(train.settings["TUNESERVE_GRACE_PERIOD_S"]) + 2 * CHECKPOINT_MARGIN_S


def test_scale_autoscalers_follow_queued_work(
    scale: Rendered, serve: Workload, train: Workload
) -> None:
    hpas = scale.all("HorizontalPodAutoscaler")
    assert len(hpas) == 2
    for hpa in hpas:
        assert hpa["apiVersion"] == "autoscaling/v2"
        spec = hpa["spec"]
        # Every HPA scales a Deployment that the overlay renders.
        scale.one("Deployment", spec["scaleTargetRef"]["name"])
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    adapter = yaml.safe_load(PROMETHEUS_ADAPTER.read_text())["rules"]
    # Serving: requests waiting for a batch slot, per pod (a custom metric for pods).
    (metric,) = scale.autoscaler(serve.name)["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "tuneserve_generation_queue_depth"
    (rule,) = adapter["custom"]
    assert rule["seriesQuery"].startswith("tuneserve_generation_queue_depth{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # Training: the jobs in the shared store, one number for the namespace.
    (metric,) = scale.autoscaler(train.name)["spec"]["metrics"]
    assert metric["type"] == "External"
    (rule,) = adapter["external"]
    assert rule["name"]["as"] == metric["external"]["metric"]["name"]
    assert rule["seriesQuery"].startswith("tuneserve_job_queue_length{")
    assert 'state="RUNNING"' in rule["metricsQuery"]


def test_scale_keeps_no_state_on_a_pod_volume(scale: Rendered) -> None:
    claims = {o["metadata"]["name"]: o for o in scale.all("PersistentVolumeClaim")}
    for workload in scale.workloads:
        for volume in workload.pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                claim = claims[volume["persistentVolumeClaim"]["claimName"]]
                # Many pods on many nodes: no ReadWriteOnce claim, and read-only.
                assert "ReadWriteOnce" not in claim["spec"]["accessModes"], volume["name"]
                assert volume["persistentVolumeClaim"]["readOnly"] is True
        settings = workload.settings
        _, data = workload.mounted_from(settings["TUNESERVE_DATA_DIR"])
        # The data dir (with the adapter cache) is the pod's own and holds the whole cache.
        cache = int(settings["TUNESERVE_ADAPTER_CACHE_BYTES"])
        assert quantity(data["emptyDir"]["sizeLimit"]) > cache
        _, models = workload.mounted_from("/var/cache/tuneserve")
        assert "emptyDir" in models
        for root in settings["TUNESERVE_DATASET_ROOTS"].split(":"):
            mount, _ = workload.mounted_from(root)
            assert mount["readOnly"] is True


def test_scale_credentials_come_only_from_secrets(scale: Rendered) -> None:
    # The operator creates the Secrets; the overlay renders none.
    assert not scale.all("Secret")
    for workload in scale.workloads:
        env = workload.env
        secrets: dict[str, set[str]] = {}
        for name, var in env.items():
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] == name and ref.get("optional") is False
                secrets.setdefault(ref["name"], set()).add(name)
            elif CREDENTIAL.search(name):
                pytest.fail(f"{workload.name}: {name} is not from a Secret")
        assert secrets == SCALE_SECRETS
        for key in workload.settings:
            assert not CREDENTIAL.search(key), f"{key} is in a ConfigMap"
        for setting in ("TUNESERVE_JOB_STORE", "TUNESERVE_ARTIFACT_STORE"):
            url = urlsplit(workload.settings[setting])
            assert url.password is None and ":" not in (url.username or ""), setting
    # Nothing rendered carries one of those values in the clear.
    assert not re.search(r"(?im)^\s*(PGPASSWORD|AWS_SECRET_ACCESS_KEY)\s*[:=]\s*\S", scale.text)


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/scale"])
def test_the_overlays_image_setting_is_the_image_deployed(overlay: str) -> None:
    """An overlay's `images:` entry must name the image as the base left it, or editing
    its tag changes nothing."""
    kustomization = yaml.safe_load((K8S / overlay / "kustomization.yaml").read_text())
    (entry,) = kustomization["images"]
    wanted = f"{entry['newName']}:{entry['newTag']}"
    images = {
        c["image"]
        for d in render(overlay).all("Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {wanted}
    assert entry["name"] == entry["newName"]  # the base's name, not "tuneserve"
