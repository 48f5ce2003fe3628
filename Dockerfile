# syntax=docker/dockerfile:1
# The tuneserve CUDA image: `tuneserve serve` on a GPU node.
#
#   docker build -t REGISTRY/tuneserve:TAG .
#   docker build --build-arg TORCH_VERSION=2.13.0 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 -t ... .
#
# The torch wheel brings its own CUDA libraries (cuBLAS, cuDNN, NCCL as pip packages), so
# the CUDA image is the small `base` flavour: it adds the NVIDIA container settings and
# NVIDIA_REQUIRE_CUDA, which makes the container runtime refuse a node whose driver is too
# old for CUDA 13.0 with a clear message instead of a late "no CUDA device". Keep the two
# in step: this CUDA major.minor and the torch index's cuXYZ must match (torch 2.13's
# default Linux wheels are built for CUDA 13.0). Both stages start from this one.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS cuda

# --- builder: a venv with torch (CUDA), the generated API code and our two packages ----
FROM cuda AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3008 (pin apt versions): the CUDA image tag pins the Ubuntu release; pinning python3's
# exact Ubuntu revision would break the build at each Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# torch first, on its own from the CUDA index: the biggest and slowest layer changes only
# when TORCH_VERSION does. constraints.txt leaves torch out, so the two never disagree.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/tuneserve \
    && /opt/tuneserve/bin/pip install --upgrade pip \
    && /opt/tuneserve/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# The tested ranges of every other dependency, the same file `make setup` and CI install
# with; it pins the protobuf generator too (at the grpcio floor).
COPY constraints.txt ./
# Generates the protobuf code only; it never reaches the final image.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/protoc \
    && /opt/protoc/bin/pip install -c constraints.txt grpcio-tools

COPY proto/ proto/
COPY clients/python/ clients/python/
# The same as `make proto`: the client package owns the generated code; protoc names the
# Python modules after the .proto's path, so the file is staged as tuneserve_client/v1/.
RUN mkdir -p build/proto/tuneserve_client/v1 clients/python/src/tuneserve_client/v1 \
    && cp proto/tuneserve/v1/tuneserve.proto build/proto/tuneserve_client/v1/ \
    && /opt/protoc/bin/python -m grpc_tools.protoc -I build/proto \
        --python_out=clients/python/src --grpc_python_out=clients/python/src \
        --pyi_out=clients/python/src build/proto/tuneserve_client/v1/tuneserve.proto \
    && touch clients/python/src/tuneserve_client/v1/__init__.py

COPY pyproject.toml README.md ./
COPY service/ service/
# Non-editable, runtime dependencies only (no dev extras), within the tested ranges. pip
# keeps the CUDA torch installed above: it satisfies peft's and transformers' torch
# requirement.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/tuneserve/bin/pip install -c constraints.txt ./clients/python . \
    && /opt/tuneserve/bin/pip check \
    && /opt/tuneserve/bin/python -c "import torch, tuneserve.cli, tuneserve_client.v1.tuneserve_pb2_grpc; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# --- runtime: python, the venv, nothing else ------------------------------------------
FROM cuda AS runtime

ARG UID=10001
ARG GID=10001

ENV DEBIAN_FRONTEND=noninteractive

# DL3008: as in the builder. ca-certificates: Hub downloads when the base model is a Hub
# id and the cluster allows egress. No compilers, no pip tooling beyond the venv's.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${GID}" tuneserve \
    && useradd --system --uid "${UID}" --gid "${GID}" --home-dir /home/tuneserve \
        --create-home --shell /usr/sbin/nologin tuneserve \
    && mkdir -p /var/lib/tuneserve /var/cache/tuneserve \
    && chown "${UID}:${GID}" /var/lib/tuneserve /var/cache/tuneserve

COPY --from=builder /opt/tuneserve /opt/tuneserve

# Data (job store, adapters) and caches are volumes in Kubernetes; the root filesystem can
# stay read-only. HF_HOME holds downloaded base models; torch's, triton's and CUDA's JIT
# caches go to the same writable place.
ENV PATH=/opt/tuneserve/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TUNESERVE_DATA_DIR=/var/lib/tuneserve \
    TUNESERVE_LOG_FORMAT=json \
    HF_HOME=/var/cache/tuneserve/huggingface \
    XDG_CACHE_HOME=/var/cache/tuneserve \
    TRITON_CACHE_DIR=/var/cache/tuneserve/triton \
    CUDA_CACHE_PATH=/var/cache/tuneserve/nv \
    HOME=/home/tuneserve

WORKDIR /var/lib/tuneserve
USER ${UID}:${GID}

# gRPC API, plaintext gRPC health (when TUNESERVE_HEALTH_LISTEN is set), Prometheus.
EXPOSE 50051 50052 9090

# grpc.health.v1 on the plaintext health port when there is one, else on the main port
# (which is plaintext unless TLS is on: set TUNESERVE_HEALTH_LISTEN with TLS). The start
# period covers loading and warming a large model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; a = os.environ.get('TUNESERVE_HEALTH_LISTEN') or os.environ.get('TUNESERVE_LISTEN') or ':50051'; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + a.rpartition(':')[2])).Check(h.HealthCheckRequest(), timeout=5); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]

ENTRYPOINT ["tuneserve", "serve"]
