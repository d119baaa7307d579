# Vitrine: `make demo` runs the whole job on the embedded data, `make test` runs the tests.
# Both install what they need first (a venv in .venv with pinned dependencies).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed
PROTO_SRC := $(wildcard protos/vitrine/v1/*.proto)
PROTO_OUT := shared/proto/vitrine/v1
PROTO_STAMP := $(PROTO_OUT)/.generated
WORKDIR ?= var/demo
# Real public data (never copied into the repository); see ../shared/data/README.md.
DATA_DIR ?= ../shared/data
EVAL_OUT ?= var/eval

.PHONY: install tools protos demo test eval bench loadtest lint typecheck image manifests clean

install: $(STAMP) $(PROTO_STAMP)

# torch first: pinned to the CPU build so sentence-transformers does not pull CUDA.
$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Stubs are generated, not committed: see README "Generated stubs".
$(PROTO_STAMP): $(PROTO_SRC) $(STAMP)
	rm -rf shared/proto/vitrine && mkdir -p $(PROTO_OUT)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=shared/proto --grpc_python_out=shared/proto \
		--mypy_out=shared/proto --mypy_grpc_out=shared/proto $(PROTO_SRC)
	sed -i -E 's/^from vitrine\.v1 import/from shared.proto.vitrine.v1 import/' $(PROTO_OUT)/*.py $(PROTO_OUT)/*.pyi
	touch shared/proto/vitrine/__init__.py $(PROTO_OUT)/__init__.py $(PROTO_STAMP)

protos: $(PROTO_STAMP)

# checkov (deploy/ policy checks) lives in its own venv: its pins clash with ours.
$(TOOLS_STAMP): requirements-tools.txt
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet -r requirements-tools.txt
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)

demo: install
	$(VENV)/bin/vitrine demo --workdir $(WORKDIR)

# MovieLens 100K, both protocols, when the data is present.
eval: install
	@if [ -f $(DATA_DIR)/ml-100k/u.data ]; then \
		for protocol in random temporal; do \
			$(VENV)/bin/vitrine evaluate --dataset movielens-100k:$(DATA_DIR)/ml-100k \
				--protocol $$protocol --k 10 --out $(EVAL_OUT)/ml-100k-$$protocol || exit 1; \
		done; \
	else \
		echo "no MovieLens 100K at $(DATA_DIR)/ml-100k (set DATA_DIR); nothing to evaluate"; \
	fi

# A bounded local load test (about 2 minutes): small artifacts, both services on loopback,
# locust headless; prints latency/throughput/errors, writes benchmarks/results/loadtest.json
# and the loadtest section of docs/benchmarks.md. See deploy/loadtest/README.md.
loadtest: install
	$(PY) -m deploy.loadtest local

# Performance at 1M items (docs/benchmarks.md): index grid + autotuner, both services under
# load, in-process floor. Bounded (< 20 min on 2 cores); BENCH_ITEMS=100000 for a quick run.
BENCH_ITEMS ?= 1000000
BENCH_NAME ?= bench
bench: install
	nice -n 10 $(PY) -m benchmarks.run --name $(BENCH_NAME) --items $(BENCH_ITEMS)

test: install tools
	$(PY) -m pytest -q

# Both container images (deploy/docker/Dockerfile, targets retrieval and ranking) with
# podman or docker; fails naming what is missing when neither can build. Not part of
# `make test` (slow; needs an engine); the Dockerfile is linted there. See docs/deploy.md.
image:
	deploy/docker/build-images.sh

# Render every Kustomize overlay into var/k8s/<overlay>.yaml (what `kubectl apply -k` applies).
manifests:
	@mkdir -p var/k8s
	@for overlay in deploy/k8s/overlays/*/; do \
		name=$$(basename $$overlay); \
		kubectl kustomize $$overlay > var/k8s/$$name.yaml || exit 1; \
		echo "var/k8s/$$name.yaml"; \
	done

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy shared retrieval_service ranking_service tests deploy benchmarks

clean:
	rm -rf $(VENV) $(TOOLS_VENV) var shared/proto/vitrine .pytest_cache .mypy_cache .ruff_cache
