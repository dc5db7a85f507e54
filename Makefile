# Two commands a user types on a fresh machine: `make demo` and `make test`.
# Each creates or reuses .venv and installs exactly what setup.py lists (re-installs when setup.py changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo_out
DEMO_PRETRAIN_EPOCHS ?= 15
FMNIST   := /usr/share/datasets/fashion-mnist
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS     := dataset-fashion-mnist slurmctld slurmd slurm-client munge
# No hub downloads at run time; Ray stays on loopback (see README, "Offline and loopback").
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv debs test demo bench clean

venv: $(STAMP)

# Debian packages the demo and tests use: real labelled images (Fashion-MNIST), a real Slurm for the launch tests.
debs:
	@dpkg -s $(DEBS) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEBS) >/dev/null; }

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: $(STAMP) debs
	$(PY) -m pytest -q tests

# The demo uses the same command lines a user types; each later stage appends its step here.
demo: $(STAMP) debs
	rm -rf $(DEMO_DIR)
	@echo "== 1. data: Fashion-MNIST (Debian package) -> class folders -> WebDataset shards -> verify"
	$(PY) -m data_tools idx-to-folder $(FMNIST)/train-images-idx3-ubyte.gz $(FMNIST)/train-labels-idx1-ubyte.gz \
		--out $(DEMO_DIR)/fashion_src --per-class 300
	$(PY) -m data_tools shard-folder fashion $(DEMO_DIR)/fashion_src --generic --out $(DEMO_DIR)/shards/fashion \
		--shard-size 250 --min-shards 4
	$(PY) -m data_tools verify $(DEMO_DIR)/shards/fashion
	@echo "== 2. pretraining: tiny MAE ViT + random tiny CLIP teacher, 2 processes (DDP, gloo), $(DEMO_PRETRAIN_EPOCHS) epochs"
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 2 pretrain/main.py \
		--config configs/pretrain/tiny.yaml "data.train=[$(DEMO_DIR)/shards/fashion/train/{00000..00009}.tar]" \
		run.output_dir=$(DEMO_DIR)/pretrain train.epochs=$(DEMO_PRETRAIN_EPOCHS) optim.blr=1.5e-3 \
		run.ckpt_every=200 train.image_every=200
	@echo "== 3. fine-tuning the pretrained encoder and a from-scratch one, same recipe and budget, 2 processes"
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 2 finetune/main.py --config configs/finetune/tiny.yaml \
		--dataset fashion --data $(DEMO_DIR)/shards/fashion --checkpoint $(DEMO_DIR)/pretrain \
		run.output_dir=$(DEMO_DIR)/finetune_pretrained
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 2 finetune/main.py --config configs/finetune/tiny.yaml \
		--dataset fashion --data $(DEMO_DIR)/shards/fashion --from-scratch run.output_dir=$(DEMO_DIR)/finetune_scratch
	@echo "== results (test split of the demo's Fashion-MNIST subset)"
	$(PY) -m finetune.report $(DEMO_DIR)/finetune_pretrained $(DEMO_DIR)/finetune_scratch \
		--labels pretrained from-scratch --out $(DEMO_DIR)/results.md
	@echo "== done: shards in $(DEMO_DIR)/shards/fashion, runs in $(DEMO_DIR)/{pretrain,finetune_*}, table in $(DEMO_DIR)/results.md"
	@echo "   view them with: $(VENV)/bin/tensorboard --logdir $(DEMO_DIR) --host 127.0.0.1"

# Speed measurements (never part of `make test`): JSON under bench/results/, summaries on the console.
bench: $(STAMP)
	$(PY) bench/loader.py
	$(PY) bench/data_wait.py
	$(PY) bench/pretrain_throughput.py
	$(PY) bench/pretrain_throughput.py --teachers cached --strategies ddp zero1 zero2 --out bench/results/strategies.json
	$(PY) bench/mae_step.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
