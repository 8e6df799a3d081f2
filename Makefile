# vlm-grpo blueprint: GRPO + LoRA fine-tuning of Qwen2.5-VL with TRL, vLLM (colocate) and DeepSpeed ZeRO-3.
# `make` (or `make help`) lists the targets; every knob below is `VAR ?= default`, override on the command line.
.DEFAULT_GOAL := help
SHELL := /bin/bash

# ---- local environment --------------------------------------------------------------------------------
## PYTHON: interpreter used to create the virtualenv
PYTHON ?= python3
## VENV: virtualenv holding the pinned CPU stack (torch 2.8.0, no vLLM)
VENV ?= .venv
## REQS: requirements installed into $(VENV)
REQS ?= code/vlm-grpo/requirements-dev.txt
## SMOKE_DIR: where `make smoke` writes the tiny model and the adapter
SMOKE_DIR ?= outputs/smoke
## SMOKE_STEPS: GRPO steps of the offline smoke run
SMOKE_STEPS ?= 4
## PYTEST_ARGS: extra pytest arguments, e.g. PYTEST_ARGS="-k rewards -x"
PYTEST_ARGS ?= 

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv smoke test

help: ## list targets and knobs
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): code/vlm-grpo/requirements.txt code/vlm-grpo/requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -r $(REQS)
	touch $@

venv: $(STAMP) ## create $(VENV) with the pinned CPU stack (torch 2.8.0 + the runtime pins, no vLLM)

smoke: $(STAMP) ## offline GRPO run: tiny Qwen2.5-VL, synthetic data, 2-process ZeRO-3 on CPU; prints the adapter path
	VPY=$(VPY) SMOKE_DIR=$(SMOKE_DIR) SMOKE_STEPS=$(SMOKE_STEPS) bash scripts/smoke.sh

test: $(STAMP) ## run the test suite on CPU (everything but `gpu`-marked tests)
	$(VPY) -m pytest $(PYTEST_ARGS)
