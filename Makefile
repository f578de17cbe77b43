# ddpm-lab: every command a user needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEVICE ?= cpu
STAMP := $(VENV)/.stamp-install
# The optional extras (W&B dashboard, Optuna search): only the tests and their own targets need them.
STAMP_EXTRAS := $(VENV)/.stamp-extras

.PHONY: help install quickstart test test-all lint format ablation ablation-cpu objectives objectives-cpu vdm-cpu ablation-samplers table bench sampler-table dashboard search clean

help:  ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project (torch 2.14.1, torchvision 0.29.1)

$(STAMP_EXTRAS): $(STAMP)
	$(PIP) install --quiet -e '.[dev,dashboard,optuna]'
	touch $(STAMP_EXTRAS)

quickstart: install  ## train the quickstart model on the embedded digits (CPU, a few minutes)
	$(CPU_MALLOC) $(PY) src/train.py experiment=quickstart

test: $(STAMP_EXTRAS)  ## fast test suite (CI), with the optional extras so their tests run
	$(PY) -m pytest -q

test-all: $(STAMP_EXTRAS)  ## fast and slow tests
	$(PY) -m pytest -q -m "slow or not slow"

lint: install  ## ruff format check and lint
	$(VENV)/bin/ruff format --check src tests bench notebooks/*.py
	$(VENV)/bin/ruff check src tests bench notebooks/*.py

format: install  ## ruff format and autofix
	$(VENV)/bin/ruff format src tests bench notebooks/*.py
	$(VENV)/bin/ruff check --fix src tests bench notebooks/*.py

# ---------------------------------------------------------------- Table 2 ablation (docs/ablation.md)
comma := ,
# The objective rows (conf/experiment/): the paper's six, then three extensions.
ABLATION_EXPERIMENTS := table2_mu_vlb_learned,table2_mu_vlb_fixed,table2_mu_simple,table2_eps_vlb_learned,table2_eps_vlb_fixed,table2_eps_simple,ext_x0_simple,ext_v_simple,ext_eps_hybrid_learned_range
# The objectives-as-weightings rows (docs/objectives.md), compared with table2_eps_simple.
OBJECTIVE_EXPERIMENTS := obj_eps_min_snr,obj_v_min_snr,obj_eps_p2,obj_v_sigmoid,obj_edm,obj_v_zero_snr
OBJECTIVE_SEEDS ?= 0,1,2
# The VDM rows (docs/objectives.md): their schedule is part of the objective, so they run without
# the sweep's schedule=... (learned, and cosine's continuous log SNR).
VDM_EXPERIMENTS := vdm_learned,vdm_cosine
SCHEDULES ?= linear,cosine
SEEDS ?= 0
# Extra Hydra overrides, e.g. ABLATION_ARGS='hydra/launcher=submitit_slurm trainer=ddp'.
ABLATION_ARGS ?=
# Arguments of `python -m ddpm.ablation` (W&B table: offline without credentials).
TABLE_ARGS ?= --wandb
# Threads per training process of `make ablation-cpu` (CPU_STREAMS processes run in parallel).
CPU_THREADS ?= 1
# Keep freed memory in the heap, so glibc does not return the sampler's batch activations to the
# OS after every step (the page faults would slow the evaluation).
CPU_MALLOC ?= MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
NOW := $(shell date +%Y-%m-%d_%H-%M-%S)

# Both ablation targets pass resume=true: after a crash, re-run with SWEEP=<the same directory> and
# finished jobs return their metrics.json, killed ones continue from checkpoints/last.ckpt.
ablation: install  ## Table 2 at paper scale on CIFAR-10 (GPU cluster): SEEDS=0,1,2 ABLATION_ARGS='hydra/launcher=submitit_slurm'
	@dir=$(or $(SWEEP),logs/ablation/multiruns/$(NOW)); status=0; echo "sweep: $$dir (after a crash: make ablation SWEEP=$$dir)"; \
	$(PY) src/train.py -m experiment=$(ABLATION_EXPERIMENTS) schedule=$(SCHEDULES) seed=$(SEEDS) \
		+scale=paper resume=true hydra.sweep.dir=$$dir $(ABLATION_ARGS) || status=$$?; \
	$(PY) -m ddpm.ablation $$dir $(TABLE_ARGS); exit $$status

# The CPU study (docs/results/study.md): every objective row on the embedded digits, CPU_SEEDS
# seeds each, the rows dealt round-robin into CPU_STREAMS parallel streams of one thread each
# (the baseline ε + L_simple first, so every stream can pair with it as soon as possible).
CPU_EXPERIMENTS ?= table2_eps_simple,$(subst table2_eps_simple$(comma),,$(ABLATION_EXPERIMENTS)),$(OBJECTIVE_EXPERIMENTS)
CPU_SCHEDULES ?= linear
CPU_SEEDS ?= 0,1,2,3,4
CPU_STREAMS ?= 2

ablation-cpu: install  ## the CPU study: every row, linear, 5 seeds, on 2 cores (resumable), then the table
	@dir=$(or $(SWEEP),logs/ablation_cpu/multiruns/$(NOW)); mkdir -p $$dir; echo "sweep: $$dir (after a crash: make ablation-cpu SWEEP=$$dir)"; \
	start=$$(date +%s); pids=""; status=0; \
	trap 'kill $$pids 2>/dev/null; exit 130' INT TERM; \
	for i in $$(seq 1 $(CPU_STREAMS)); do \
		rows=$$(echo "$(CPU_EXPERIMENTS)" | tr ',' '\n' | awk -v n=$(CPU_STREAMS) -v i=$$i '(NR - 1) % n == i - 1' | paste -sd, -); \
		[ -n "$$rows" ] || continue; \
		echo "stream $$i: $$rows (log: $$dir/stream$$i.log)"; \
		OMP_NUM_THREADS=$(CPU_THREADS) $(CPU_MALLOC) $(PY) src/train.py -m experiment=$$rows \
			schedule=$(CPU_SCHEDULES) seed=$(CPU_SEEDS) +scale=cpu resume=true \
			hydra.sweep.dir=$$dir/stream$$i $(ABLATION_ARGS) >> $$dir/stream$$i.log 2>&1 & pids="$$pids $$!"; \
	done; \
	for pid in $$pids; do wait $$pid || status=1; done; \
	echo $$(( $$(date +%s) - start )) > $$dir/wall_clock_s; \
	echo "wall-clock: $$(cat $$dir/wall_clock_s) s"; \
	$(PY) -m ddpm.ablation $$dir $(TABLE_ARGS); exit $$status

objectives: install  ## the weighting rows + ε/L_simple at paper scale (GPU cluster): ABLATION_ARGS='hydra/launcher=submitit_slurm'
	$(MAKE) ablation ABLATION_EXPERIMENTS=$(OBJECTIVE_EXPERIMENTS)$(comma)table2_eps_simple SCHEDULES=linear SEEDS=$(OBJECTIVE_SEEDS)

objectives-cpu: install  ## the weighting rows + ε/L_simple on the digits (the CPU study's protocol), then the table
	$(MAKE) ablation-cpu CPU_EXPERIMENTS=table2_eps_simple$(comma)$(OBJECTIVE_EXPERIMENTS)

vdm-cpu: install  ## the two VDM rows, CPU study protocol, CPU_SEEDS seeds, one stream each (resumable): SWEEP=<dir>
	@dir=$(or $(SWEEP),logs/vdm_cpu/multiruns/$(NOW)); mkdir -p $$dir; echo "sweep: $$dir (after a crash: make vdm-cpu SWEEP=$$dir)"; \
	pids=""; status=0; trap 'kill $$pids 2>/dev/null; exit 130' INT TERM; \
	for exp in $$(echo "$(VDM_EXPERIMENTS)" | tr ',' ' '); do \
		OMP_NUM_THREADS=$(CPU_THREADS) $(CPU_MALLOC) $(PY) src/train.py -m experiment=$$exp \
			seed=$(CPU_SEEDS) +scale=cpu resume=true hydra.sweep.dir=$$dir/$$exp $(ABLATION_ARGS) \
			>> $$dir/$$exp.log 2>&1 & pids="$$pids $$!"; \
	done; \
	for pid in $$pids; do wait $$pid || status=1; done; \
	$(PY) -m ddpm.ablation $$dir $(TABLE_ARGS); exit $$status

# Samplers a sweep's checkpoints are re-evaluated with (name:steps), for the ranking-by-sampler table.
SAMPLERS ?= ddim:50 dpmpp_2m:15

ablation-samplers: install  ## re-evaluate a sweep's checkpoints under SAMPLERS, then the table: make ablation-samplers SWEEP=<dir>
	@test -n "$(SWEEP)" || { echo "usage: make ablation-samplers SWEEP=<sweep directory> [SAMPLERS='ddim:50 dpmpp_2m:15']" >&2; exit 2; }
	$(CPU_MALLOC) $(PY) -m ddpm.sweep_eval $(SWEEP) $(foreach s,$(SAMPLERS),--sampler $(s))
	$(PY) -m ddpm.ablation $(SWEEP) $(TABLE_ARGS)

table: install  ## ablation.md/.csv from a sweep directory: make table SWEEP=logs/ablation_cpu/multiruns/<time>
	@test -n "$(SWEEP)" || { echo "usage: make table SWEEP=<sweep directory> [TABLE_ARGS=...]" >&2; exit 2; }
	$(PY) -m ddpm.ablation $(SWEEP) $(TABLE_ARGS)

# ---------------------------------------------------------------- speed benchmark (docs/performance.md)
MODELS ?= ddpm_cifar10 small
# Extra arguments of bench/bench.py, e.g. BENCH_ARGS='--quick' or '--options default compile'.
BENCH_ARGS ?=

bench: install  ## speed benchmark -> bench/results/<device>.{json,md}: make bench DEVICE=cpu|cuda MODELS="ddpm_cifar10 small"
	$(PY) bench/bench.py --device $(DEVICE) --models $(MODELS) $(BENCH_ARGS)

sampler-table: install  ## fd and wall-clock per sampler, and the estimated bound, on a checkpoint: make sampler-table CKPT=<ckpt>
	@test -n "$(CKPT)" || { echo "usage: make sampler-table CKPT=<checkpoints/last.ckpt> [OUT=docs/results/samplers]" >&2; exit 2; }
	$(CPU_MALLOC) $(PY) bench/samplers.py --ckpt $(CKPT) --out $(or $(OUT),docs/results/samplers)

# ---------------------------------------------------------------- W&B dashboard and Optuna search
# Hydra overrides of the sweep a dashboard is for: they fix the protocol-bearing metric names.
DASHBOARD_ARGS ?=
PROJECT ?= ddpm-lab

dashboard: install  ## W&B workspace (needs `wandb login`): make dashboard ENTITY=<you> [GROUP=ablation_cpu DASHBOARD_ARGS='data=digits +scale=cpu']
	@test -n "$(ENTITY)" || { echo "usage: make dashboard ENTITY=<W&B entity> [GROUP=<W&B group>] [DASHBOARD_ARGS=...]" >&2; exit 2; }
	$(PIP) install --quiet -e '.[dashboard]'
	$(PY) -m ddpm.dashboard --entity $(ENTITY) --project $(PROJECT) $(if $(GROUP),--sweep-group $(GROUP)) $(DASHBOARD_ARGS)

search: install  ## Optuna search of the quickstart's lr, EMA decay and warm-up on digits (CPU): make search [TRIALS=20]
	$(PIP) install --quiet -e '.[optuna]'
	$(CPU_MALLOC) $(PY) src/train.py -m experiment=quickstart hparams_search=quickstart_optuna $(if $(TRIALS),hydra.sweeper.n_trials=$(TRIALS))

clean:  ## remove run outputs (keeps .venv)
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
