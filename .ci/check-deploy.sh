#!/usr/bin/env bash
# Deploy checks, run by `make deploy-lint` (and so by `make test`):
#   1. hadolint on the Dockerfile;
#   2. `kubectl kustomize` renders the base, every overlay and the dashboards;
#   3. kubernetes-validate checks every rendered object against the pinned Kubernetes
#      version's schemas, strictly (an unknown field is an error);
#   4. checkov on the rendered manifests and on the Dockerfile. Skipped checks carry their
#      reason where they are skipped (checkov.io/skipN annotations in k8s/).
# The tools come from .venv-deploy (make deploy-lint installs them); kubectl from PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${DEPLOY_VENV:-.venv-deploy}/bin"
KUBECTL="${KUBECTL:-kubectl}"
# The oldest Kubernetes release the manifests must apply to.
K8S_VERSION="${K8S_VERSION:-1.33.0}"
OUT=build/deploy
# What can be applied, and what is only a part of it (the dashboards live in the base
# too, where they get a namespace; alone they are rendered and validated, not scanned).
DEPLOYABLES=(k8s/base k8s/overlays/gpu k8s/overlays/tls k8s/overlays/scale)
PARTS=(k8s/dashboards)
# Custom resources have no schema among the built-in ones kubernetes-validate ships; the
# API server validates them against the operator's CRD when they are applied. Each group
# skipped here is named on purpose: an unknown kind from anywhere else fails the check.
CRD_GROUPS=(monitoring.coreos.com)

step() { printf '\n== %s\n' "$*"; }
seconds() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.1fs", b - a }'; }

for tool in hadolint kubernetes-validate checkov; do
    if [[ ! -x "$TOOLS/$tool" ]]; then
        echo "check-deploy: $TOOLS/$tool is missing; run 'make deploy-lint' (it installs them)" >&2
        exit 1
    fi
done
if ! command -v "$KUBECTL" >/dev/null; then
    echo "check-deploy: kubectl not found (set KUBECTL=/path/to/kubectl); it renders k8s/ with" \
        "its built-in kustomize. Install it from https://kubernetes.io/docs/tasks/tools/" >&2
    exit 1
fi

step "hadolint Dockerfile"
t=$(seconds)
"$TOOLS/hadolint" Dockerfile
echo "clean ($(elapsed "$t"))"

step "kubectl kustomize ($("$KUBECTL" version --client 2>/dev/null | tr '\n' ' '))"
t=$(seconds)
rm -rf "$OUT" && mkdir -p "$OUT/rendered" "$OUT/validate"
for target in "${DEPLOYABLES[@]}" "${PARTS[@]}"; do
    name=$(echo "$target" | tr '/' '-')
    "$KUBECTL" kustomize "$target" >"$OUT/rendered/$name.yaml"
    echo "$target -> $OUT/rendered/$name.yaml ($(grep -c '^kind:' "$OUT/rendered/$name.yaml") objects)"
done
echo "rendered ($(elapsed "$t"))"

step "kubernetes-validate --strict, Kubernetes $K8S_VERSION (skipped CRD groups: ${CRD_GROUPS[*]})"
t=$(seconds)
"$TOOLS/python" - "$OUT" "${CRD_GROUPS[@]}" <<'PY'
import sys
from pathlib import Path

import yaml

out, groups = Path(sys.argv[1]), set(sys.argv[2:])
for rendered in sorted((out / "rendered").glob("*.yaml")):
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    keep = [d for d in docs if d["apiVersion"].split("/")[0] not in groups]
    for d in docs:
        if d not in keep:
            print(f"{rendered.name}: {d['kind']} {d['metadata']['name']}: CRD, not validated here")
    (out / "validate" / rendered.name).write_text(yaml.safe_dump_all(keep, sort_keys=False))
PY
log="$OUT/kubernetes-validate.log"
status=0
"$TOOLS/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$OUT"/validate/*.yaml >"$log" 2>&1 ||
    status=$?
cat "$log"
if [[ $status -ne 0 ]] || grep -q "Couldn't find schema" "$log"; then
    echo "check-deploy: kubernetes-validate failed (an unknown kind needs a schema or a" \
        "justified entry in CRD_GROUPS)" >&2
    exit 1
fi
echo "valid ($(elapsed "$t"))"

# --skip-download: no calls to Prisma Cloud (CI has no network for it and needs none).
step "checkov --framework kubernetes (rendered manifests)"
t=$(seconds)
files=()
for target in "${DEPLOYABLES[@]}"; do
    files+=(--file "$OUT/rendered/$(echo "$target" | tr '/' '-').yaml")
done
"$TOOLS/checkov" "${files[@]}" --framework kubernetes --skip-download --compact --quiet
echo "skipped on purpose, with the reason:"
grep -rhoE "checkov\.io/skip[0-9]+: .*" k8s/ | sort -u | sed 's/^/  /'
echo "($(elapsed "$t"))"

step "checkov --framework dockerfile (Dockerfile)"
t=$(seconds)
"$TOOLS/checkov" --file Dockerfile --framework dockerfile --skip-download --compact --quiet
echo "($(elapsed "$t"))"
