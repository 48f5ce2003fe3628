# One command for each routine task. The Quickstart is `make demo` then `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# CPU machines take the local CPU build of torch; the CUDA image installs its own.
TORCH_SPEC ?= torch==2.13.0
PROTO_OUT := service/tuneserve/v1
PY_SOURCES := $(wildcard service tests examples bench)

.PHONY: setup proto demo test unit lint fmt serve clean bench

setup: $(VENV)/.installed $(PROTO_OUT)/__init__.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Generated code is built from proto/, never edited or committed.
proto $(PROTO_OUT)/__init__.py: proto/tuneserve/v1/tuneserve.proto $(VENV)/.installed
	mkdir -p $(PROTO_OUT)
	$(PY) -m grpc_tools.protoc -I proto --python_out=service --grpc_python_out=service \
		--pyi_out=service proto/tuneserve/v1/tuneserve.proto
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

test: lint
	$(BIN)/pytest -q

# Speed against the seeds' recipes, measured in the same run: writes bench/results/*.json.
bench: setup
	$(PY) -m bench.train
	$(PY) -m bench.generate

serve: setup
	$(BIN)/tuneserve serve

clean:
	rm -rf $(VENV) $(PROTO_OUT) .demo .pytest_cache .mypy_cache .ruff_cache
