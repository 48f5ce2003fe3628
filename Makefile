# One command for each routine task. The Quickstart is `make demo` then `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# CPU machines take the local CPU build of torch; the CUDA image installs its own.
TORCH_SPEC ?= torch==2.13.0
# The client package owns the generated code; the server imports it from there.
CLIENT_SRC := clients/python/src
PROTO_OUT := $(CLIENT_SRC)/tuneserve_client/v1
PY_SOURCES := $(wildcard service clients/python/src tests examples bench)
# The tested range of every dependency (constraints.txt): every install here, CI's and the
# Dockerfile's go through it. A fresh venv resolves to the newest versions it allows.
CONSTRAINTS := constraints.txt

.PHONY: setup proto demo test test-quick unit lint fmt serve clean bench test-floor

setup: $(VENV)/.installed $(PROTO_OUT)/__init__.py clients/node/node_modules/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e clients/python -e ".[dev]"
	touch $@

# The Node.js client example (clients/node), installed from its lock file once. Machines
# without npm skip it.
clients/node/node_modules/.installed: clients/node/package.json clients/node/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix clients/node --no-audit --no-fund && touch $@; \
	else echo "npm not found: skipping the Node.js client (clients/node)"; fi

# Generated code is built from proto/, never edited or committed. protoc names Python
# modules after the .proto's path, so the file is staged as tuneserve_client/v1/.
proto $(PROTO_OUT)/__init__.py: proto/tuneserve/v1/tuneserve.proto $(VENV)/.installed
	rm -rf build/proto && mkdir -p build/proto/tuneserve_client/v1 $(PROTO_OUT)
	cp proto/tuneserve/v1/tuneserve.proto build/proto/tuneserve_client/v1/
	$(PY) -m grpc_tools.protoc -I build/proto --python_out=$(CLIENT_SRC) \
		--grpc_python_out=$(CLIENT_SRC) --pyi_out=$(CLIENT_SRC) \
		build/proto/tuneserve_client/v1/tuneserve.proto
	touch $(PROTO_OUT)/__init__.py

demo: setup
	$(PY) examples/demo.py

lint: setup
	$(PY) .ci/constraints.py check $(CONSTRAINTS) pyproject.toml clients/python/pyproject.toml
	cd proto && ../$(BIN)/buf lint
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/mypy

fmt: setup
	$(BIN)/ruff check --fix $(PY_SOURCES)
	$(BIN)/ruff format $(PY_SOURCES)

test: lint deploy-lint test-floor postgresql
	$(BIN)/pytest -q

# The edit loop: every test but the slow scenarios (crash windows, the API fuzz test), which
# `make test` and CI run.
test-quick: setup postgresql
	$(BIN)/pytest -q -m "not slow"

# The job store's tests start their own PostgreSQL server (tests/postgres.py) from the
# server binaries, which a fresh Debian machine gets here; the package's own cluster is not
# created, and nothing else runs.
.PHONY: postgresql
postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; \
	then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; \
	else echo "PostgreSQL is not installed and this is not root: apt-get install" \
		"postgresql as root, or make test as root" >&2; exit 1; fi; \
	command -v apt-get >/dev/null || { echo "PostgreSQL is not installed and there is no" \
		"apt-get: install PostgreSQL's server (initdb, pg_ctl) yourself" >&2; exit 1; }; \
	set -ex; \
	$$sudo mkdir -p /etc/postgresql-common/createcluster.d; \
	echo "create_main_cluster = false" \
		| $$sudo tee /etc/postgresql-common/createcluster.d/tuneserve.conf >/dev/null; \
	$$sudo apt-get update -q; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		postgresql

# The floor end of constraints.txt (.venv is the ceiling end): a venv with every runtime
# dependency at the lowest version its range allows, running the tests that lean on their
# internals (transformers' cache layers and masks, peft's adapters and keys, chat templates,
# the gRPC health, reflection and status packages). Rebuilt from scratch when a range moves.
FLOOR_VENV := build/venv-floor
FLOOR_TESTS := tests/unit/test_inference_kv_cache.py tests/unit/test_inference_batch.py \
	tests/unit/test_inference_scheduler.py tests/unit/test_inference_lora_batch.py \
	tests/unit/test_inference_lora_files.py tests/unit/test_inference_adapters.py \
	tests/unit/test_inference_engine.py tests/unit/test_training_checkpoints.py \
	tests/unit/test_data_examples.py tests/unit/test_data_chat_template.py \
	tests/unit/test_metrics.py tests/e2e/test_service.py

test-floor: $(FLOOR_VENV)/.installed $(PROTO_OUT)/__init__.py
	$(FLOOR_VENV)/bin/python -m pip list --format=freeze | grep -iE \
		'^(transformers|peft|tokenizers|safetensors|grpcio[a-z-]*|protobuf|jinja2)=='
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

$(FLOOR_VENV)/.installed: $(CONSTRAINTS) .ci/constraints.py pyproject.toml \
		clients/python/pyproject.toml
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python .ci/constraints.py floors $(CONSTRAINTS) >$(FLOOR_VENV)/floors.txt
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install -q -c $(CONSTRAINTS) -c $(FLOOR_VENV)/floors.txt \
		"$(TORCH_SPEC)"
	$(FLOOR_VENV)/bin/python -m pip install -q -c $(CONSTRAINTS) -c $(FLOOR_VENV)/floors.txt \
		-e clients/python -e . pytest pytest-asyncio pytest-timeout
	touch $@

# The image and the manifests: hadolint, kustomize renders, kubernetes-validate, checkov
# (.ci/check-deploy.sh). The tools live in their own venv; kubectl comes from PATH.
.PHONY: deploy-lint
DEPLOY_VENV := .venv-deploy

deploy-lint: $(DEPLOY_VENV)/.installed
	DEPLOY_VENV=$(DEPLOY_VENV) .ci/check-deploy.sh

$(DEPLOY_VENV)/.installed: .ci/deploy-requirements.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEPLOY_VENV)/bin/python -m pip install -q -r .ci/deploy-requirements.txt
	touch $@

# Speed against the seeds' recipes, measured in the same run: writes bench/results/*.json.
bench: setup postgresql
	$(PY) -m bench.train
	$(PY) -m bench.train --dtype bfloat16 --datasets pareto --output bench/results/train-bf16.json
	$(PY) -m bench.generate
	$(PY) -m bench.scale

serve: setup
	$(BIN)/tuneserve serve

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) $(PROTO_OUT) build clients/node/node_modules .demo .pytest_cache \
		.mypy_cache .ruff_cache
