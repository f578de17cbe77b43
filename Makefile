# ddpm-lab: every command a user needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEVICE ?= cpu
STAMP := $(VENV)/.stamp-install

.PHONY: help install quickstart test test-all lint format ablation ablation-cpu table bench clean

help:  ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project (torch 2.14.1, torchvision 0.29.1)

quickstart: install  ## train the quickstart model on the embedded digits (CPU, a few minutes)
	$(PY) src/train.py experiment=quickstart

test: install  ## fast test suite (CI)
	$(PY) -m pytest -q

test-all: install  ## fast and slow tests
	$(PY) -m pytest -q -m "slow or not slow"

lint: install  ## ruff format check and lint
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench

format: install  ## ruff format and autofix
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

clean:  ## remove run outputs (keeps .venv)
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
