"""k8s/: what a platform engineer relies on in the rendered manifests, checked on what
`kubectl kustomize` renders for the base and every overlay (schemas and policy checks are
`make deploy-lint`'s; these are tuneserve's own invariants): one GPU, probes on the plaintext
health port the server is told to open, a grace period longer than the drain, a locked-down
pod, shared memory in RAM, a headless gRPC Service, and settings the server accepts."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuneserve.config import ENV_PREFIX, ServerConfig, load_config

K8S = Path(__file__).resolve().parents[2] / "k8s"
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl")
TARGETS = ["base", "overlays/gpu", "overlays/tls"]
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
        self.objects = [o for o in yaml.safe_load_all(out) if o]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [
            o
            for o in self.objects
            if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
        ]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment", "tuneserve")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return container

    @property
    def settings(self) -> dict[str, str]:
        """The ConfigMap the container takes its environment from."""
        (source,) = self.container["envFrom"]
        return self.one("ConfigMap", source["configMapRef"]["name"])["data"]

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


@pytest.fixture(scope="module", params=TARGETS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return Rendered(request.param)


@pytest.fixture(scope="module")
def tls() -> Rendered:
    return Rendered("overlays/tls")


def test_one_pod_on_one_gpu_node(rendered: Rendered) -> None:
    spec = rendered.deployment["spec"]
    # SQLite job store on a ReadWriteOnce volume: one writer, the old pod gone first.
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    resources = rendered.container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= resources["requests"].keys() & resources["limits"].keys()
    assert rendered.settings["TUNESERVE_DEVICE"].startswith("cuda")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        rendered.pod["tolerations"]
    )
    assert rendered.pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    image = rendered.container["image"]
    assert image != "tuneserve" and not image.endswith(":latest") and ":" in image


def test_torch_threads_follow_the_cpu_limit(rendered: Rendered) -> None:
    env = {e["name"]: e for e in rendered.container["env"]}
    field = env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "limits.cpu"
    assert field["containerName"] == rendered.container["name"]
    assert "cpu" in rendered.container["resources"]["limits"]


def test_probes_call_grpc_health_on_the_plaintext_health_port(rendered: Rendered) -> None:
    health = port(rendered.settings["TUNESERVE_HEALTH_LISTEN"])
    ports = {p["name"]: p["containerPort"] for p in rendered.container["ports"]}
    assert ports == {
        "grpc": port(rendered.settings["TUNESERVE_LISTEN"]),
        "health": health,
        "metrics": port(rendered.settings["TUNESERVE_METRICS_LISTEN"]),
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert rendered.container[probe]["grpc"] == {"port": health}, probe
    startup = rendered.container["startupProbe"]
    # Loading (and downloading) a large model: at least ten minutes before the kubelet gives up.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_grace_period_covers_the_drain_and_a_checkpoint(rendered: Rendered) -> None:
    drain = float(rendered.settings["TUNESERVE_GRACE_PERIOD_S"])
    assert rendered.pod["terminationGracePeriodSeconds"] >= drain + CHECKPOINT_MARGIN_S


def test_the_pod_is_locked_down(rendered: Rendered) -> None:
    pod = rendered.pod["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == UID
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    container = rendered.container["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert rendered.pod["automountServiceAccountToken"] is False
    assert rendered.one("ServiceAccount", "tuneserve")["automountServiceAccountToken"] is False
    # Service links would add TUNESERVE_*_PORT variables to the settings' namespace.
    assert rendered.pod["enableServiceLinks"] is False
    # A read-only root: the places the process writes to are volumes.
    for path in ("/tmp", rendered.settings["TUNESERVE_DATA_DIR"], "/var/cache/tuneserve"):
        mount, _ = rendered.mounted_from(path)
        assert not mount.get("readOnly"), path
    _, tmp = rendered.mounted_from("/tmp")
    assert "sizeLimit" in tmp["emptyDir"]


def test_shared_memory_is_a_sized_memory_emptydir(rendered: Rendered) -> None:
    mount, volume = rendered.mounted_from("/dev/shm")
    assert mount["mountPath"] == "/dev/shm"
    assert volume["emptyDir"]["medium"] == "Memory"
    assert volume["emptyDir"]["sizeLimit"]


def test_data_and_datasets_live_on_their_volumes(rendered: Rendered) -> None:
    claims = {
        o["metadata"]["name"]: o for o in rendered.objects if o["kind"] == "PersistentVolumeClaim"
    }
    _, data = rendered.mounted_from(rendered.settings["TUNESERVE_DATA_DIR"])
    assert claims[data["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]
    for root in rendered.settings["TUNESERVE_DATASET_ROOTS"].split(":"):
        mount, volume = rendered.mounted_from(root)
        assert mount["readOnly"] is True
        assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_grpc_service_is_headless_and_metrics_are_scraped(rendered: Rendered) -> None:
    labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    grpc = rendered.one("Service", "tuneserve")["spec"]
    assert grpc["clusterIP"] == "None"
    assert grpc["selector"].items() <= labels.items()
    (grpc_port,) = grpc["ports"]
    assert grpc_port["name"] == "grpc" and grpc_port["appProtocol"] == "grpc"
    assert grpc_port["targetPort"] == "grpc"

    metrics = rendered.one("Service", "tuneserve-metrics")
    assert metrics["spec"]["selector"].items() <= labels.items()
    (metrics_port,) = metrics["spec"]["ports"]
    assert metrics_port["name"] == "metrics"
    monitor = rendered.one("ServiceMonitor", "tuneserve")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    dashboard = rendered.one("ConfigMap", "tuneserve-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_settings_are_ones_the_server_accepts(rendered: Rendered) -> None:
    # Other keys (HF_HUB_OFFLINE, say) are the environment's; ours must name real settings.
    settings = {k: v for k, v in rendered.settings.items() if k.startswith(ENV_PREFIX)}
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServerConfig)}
    assert settings.keys() <= known, f"unknown settings: {sorted(settings.keys() - known)}"
    config = load_config(env={k: v for k, v in settings.items() if k not in POD_PATHS})
    assert config.health_listen and config.log_format == "json"


def test_tls_overlay_mounts_what_the_settings_name(tls: Rendered) -> None:
    settings = tls.settings
    # No key material in the repository: the Secrets are referenced, never rendered.
    assert not [o for o in tls.objects if o["kind"] == "Secret"]
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
