# fewstep: two commands for a new user, `make run` and `make test`.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.fewstep-installed
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED ?= 0

.PHONY: install data run test bench clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# torch==2.13.0 (a CPU build) only when no torch is importable: never replace a user's torch.
$(STAMP): $(VPY) pyproject.toml
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev]"
	@! $(VPY) -m pip show -q torchvision 2>/dev/null || { echo "fewstep: torchvision is installed in $(VENV); it breaks torchmetrics here: pip uninstall torchvision"; exit 1; }
	@touch $(STAMP)

# Fashion-MNIST (real dataset, for training / reference statistics; the shipped model needs none):
# the Debian package dataset-fashion-mnist, installed when missing and apt-get is usable (root).
FMNIST := /usr/share/datasets/fashion-mnist
data:
	@test -d $(FMNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
	  && echo "installed dataset-fashion-mnist" || echo "note: $(FMNIST) absent (apt-get install dataset-fashion-mnist); its tests are skipped"; }

install: $(STAMP)

run: $(STAMP)
	$(VPY) run.py $(ARGS)

# the suite in TEST_WORKERS processes (pytest-xdist), each test file whole in one of them
TEST_WORKERS ?= 2
test: $(STAMP) data
	$(VPY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m fewstep.bench $(ARGS)

clean:
	rm -rf outputs multirun wandb .pytest_cache build *.egg-info src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
