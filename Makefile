# Two commands a user types on a fresh machine: `make demo` and `make test`.
# Each creates or reuses .venv and installs exactly what setup.py lists (re-installs when setup.py changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo_out
# No hub downloads at run time; Ray stays on loopback (see README, "Offline and loopback").
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# The demo uses the same command lines a user types; each later stage appends its step here.
demo: $(STAMP)
	@echo "== runtime check: 2-process DDP on CPU (gloo), checkpoints every 10 steps, TensorBoard"
	rm -rf $(DEMO_DIR)/smoke
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m runtime.smoke \
		--config configs/smoke.yaml run.output_dir=$(DEMO_DIR)/smoke
	@echo "== done: run directory $(DEMO_DIR)/smoke (config.yaml, meta.json, checkpoints/, tb/)"
	@echo "   view it with: $(VENV)/bin/tensorboard --logdir $(DEMO_DIR) --host 127.0.0.1"

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
