# vlm-grpo blueprint: GRPO + LoRA fine-tuning of Qwen2.5-VL with TRL, vLLM (colocate) and DeepSpeed ZeRO-3.
# `make` (or `make help`) lists the targets; every knob below is `VAR ?= default`, override on the command line.
.DEFAULT_GOAL := help
SHELL := /bin/bash

# ---- local environment --------------------------------------------------------------------------------
## PYTHON: interpreter used to create the virtualenv
PYTHON ?= python3
## VENV: virtualenv holding the pinned CPU stack (torch 2.8.0, and vLLM 0.11.0 built for CPU on Linux x86-64)
VENV ?= .venv
## REQS: requirements installed into $(VENV)
REQS ?= code/vlm-grpo/requirements-dev.txt
## SMOKE_DIR: where `make smoke` writes the tiny model and the adapter
SMOKE_DIR ?= outputs/smoke
## SMOKE_STEPS: GRPO steps of the offline smoke run
SMOKE_STEPS ?= 4
## SMOKE_VLLM: 1: smoke generates with vLLM colocate, the seed's path (CPU build of vLLM); 0: with transformers
SMOKE_VLLM ?= 1
## WHEEL_DIR: cache of the vLLM 0.11.0 CPU wheel set-up builds from PyPI's sdist (reused; .whl/ is the device's wheels)
WHEEL_DIR ?= .cache/wheels
## SMOKE_ARGS: extra grpo_vlm.py flags for the smoke run, e.g. SMOKE_ARGS="--reward_funcs digit_ratio"
SMOKE_ARGS ?=
## PYTEST_ARGS: extra pytest arguments, e.g. PYTEST_ARGS="-k rewards -x"
PYTEST_ARGS ?= 

# ---- FlexAI training (the seed's `flexai training run`; experiments/vlm-grpo/README.md) ------------
## FLEXAI: the FlexAI CLI (https://docs.flex.ai/cli/); log in once with `flexai auth login`
FLEXAI ?= flexai
## NAME: training job name; inspect/logs/checkpoints act on it
NAME ?= vlm-grpo-training
## RESUME_NAME: job name of `make flexai-resume` (a FlexAI job name can be used once)
RESUME_NAME ?= $(NAME)-resume
## SECRET: name (not value) of the FlexAI secret holding your Hugging Face token, exported as HF_TOKEN
SECRET ?= hf-token
## REPO_URL: repository FlexAI clones for the job (your fork, if you changed the code)
REPO_URL ?= https://github.com/flexaihq/blueprints
## REVISION: branch, tag or commit FlexAI checks out; empty: the repository's default branch
REVISION ?=
## RUNTIME: FlexAI runtime image (torch 2.8.0, CUDA 12.8, vLLM 0.11.0; docker/Dockerfile mirrors it)
RUNTIME ?= pytorch-28-vllm-0110-nvidia
## NODES: nodes of the job; only 1 is supported (see README, Multi-node)
NODES ?= 1
## ACCELS: GPUs per node; accelerate launches one process per GPU
ACCELS ?= 2
## MODEL: base VLM on the Hugging Face Hub
MODEL ?= Qwen/Qwen2.5-VL-3B-Instruct
## OUTPUT: --output_dir of the job; FlexAI captures checkpoints written under /output-checkpoint
OUTPUT ?= /output-checkpoint/grpo-$(notdir $(MODEL))
## ARGS: extra grpo_vlm.py flags, appended last so they win, e.g. ARGS="--max_steps 50 --save_steps 25"
ARGS ?=
## CKPT: FlexAI checkpoint ID (from `make flexai-checkpoints`) for flexai-resume and flexai-fetch
CKPT ?=
## MERGE_ARGS: arguments of scripts/merge_lora.py for `make merge` (its docstring shows them; "--help" lists them)
MERGE_ARGS ?=
## BENCH_PYTHON: interpreter of `make bench`: the GPU machine's own (CUDA torch), not the CPU-only $(VENV)
BENCH_PYTHON ?= python3
## BENCH_ARGS: arguments of scripts/bench.py, e.g. BENCH_ARGS="--configs seed --steps 2" ("--help" lists them)
BENCH_ARGS ?=
## EVAL_ARGS: arguments of scripts/evaluate.py for `make eval` (its docstring shows them; "--help" lists them)
EVAL_ARGS ?=
## PLOT_ARGS: arguments of scripts/plot_training.py for `make plot`: a run folder or trainer_state.json, [--output PNG]
PLOT_ARGS ?=
## INFER_ARGS: arguments of scripts/infer.py for `make infer`: --model DIR --image FILE --question TEXT
INFER_ARGS ?=
## DEMO_DIR: where `make learning-demo` writes its tiny model, run and evaluation
DEMO_DIR ?= outputs/learning-demo
## DEMO_FIGURE: the training-curves PNG `make learning-demo` writes; DEMO_FIGURE=experiments/vlm-grpo/figures/learning_demo.png updates the guide's figure
DEMO_FIGURE ?= $(DEMO_DIR)/learning_demo.png

# ---- local Docker image (docker/Dockerfile) -----------------------------------------------------------
## DOCKER: container engine CLI
DOCKER ?= docker
## IMAGE: tag of the local image; it spells the runtime's versions
IMAGE ?= vlm-grpo:torch2.8.0-cu12.8-vllm0.11.0
# `all` when this host has NVIDIA GPUs and Docker knows the nvidia runtime, else empty
detected_gpus = $(shell nvidia-smi -L >/dev/null 2>&1 && $(DOCKER) info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia && echo all)
## DOCKER_GPUS: `--gpus` value for local-smoke (GPUs + vLLM colocate); empty: CPU only; default: detected
DOCKER_GPUS ?= $(detected_gpus)
## LOCAL_SMOKE_DIR: host folder mounted as the image's smoke output (tiny model, adapter)
LOCAL_SMOKE_DIR ?= outputs/docker-smoke

VPY := $(VENV)/bin/python
KNOBS := $(shell awk '/^[A-Z_]+ \?=/ {print $$1}' $(firstword $(MAKEFILE_LIST)))
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-cpu

# ---- derived values (not knobs) -------------------------------------------------------------------------
TRAIN_DIR := code/vlm-grpo
ACCEL_CONFIG := $(TRAIN_DIR)/deepspeed_zero3.yaml
# processes the ZeRO-3 yaml launches; `--num_processes` is passed only when the job's GPU count differs,
# so the default command stays token-identical to the seed's
CONFIG_NPROC := $(shell awk '$$1 == "num_processes:" {print $$2}' $(ACCEL_CONFIG) 2>/dev/null)
NPROC = $(shell echo $$(( $(NODES) * $(ACCELS) )))
# $(call q,VALUE): VALUE as one bash word, bare when it holds only characters bash leaves alone (so printed
# commands read like the docs), else single-quoted (a secret name may be `<HF_AUTH_TOKEN_SECRET_NAME>`)
SAFE_CHARS := a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V W X Y Z \
              0 1 2 3 4 5 6 7 8 9 _ . / : = @ + -
strip_chars = $(if $2,$(call strip_chars,$(subst $(firstword $2),,$1),$(wordlist 2,999,$2)),$1)
q = $(if $(and $(filter 1,$(words $1)),$(if $(call strip_chars,$1,$(SAFE_CHARS)),,safe)),$1,'$(subst ','"'"',$1)')

# The guards below expand to nothing or stop make with one line (`Makefile:N: *** message.  Stop.`)
# before any recipe line runs: make expands a target's whole recipe first.
require-flexai = $(if $(shell command -v $(FLEXAI) 2>/dev/null),,$(error `$(FLEXAI)` CLI not found on PATH: install it (https://docs.flex.ai/cli/), run `flexai auth login`, or set FLEXAI=/path/to/flexai))
require-ckpt = $(if $(strip $(CKPT)),,$(error CKPT is not set: list checkpoints with `make flexai-checkpoints`, then run `make $@ CKPT=<checkpoint-id>`))
# docker: the CLI on PATH, then its daemon reachable (`docker info`), else docker's own multi-line noise at build time
require-docker = $(if $(shell command -v $(DOCKER) 2>/dev/null),$(if $(shell $(DOCKER) info >/dev/null 2>&1 && echo up),,$(error `$(DOCKER) info` fails: the $(DOCKER) CLI is installed but cannot reach its engine; start it (`sudo systemctl start docker`, or Docker Desktop), check that your user may use it (the docker group), or set DOCKER=podman)),$(error `$(DOCKER)` not found on PATH: $(if $(filter docker,$(notdir $(DOCKER))),install Docker (https://docs.docker.com/engine/install/) or set DOCKER=podman,install it or set DOCKER to an engine CLI that is installed (docker is the default))))
require-counts = $(if $(shell [[ "$(NODES)" =~ ^[1-9][0-9]*$$ && "$(ACCELS)" =~ ^[1-9][0-9]*$$ ]] && echo ok),,$(error NODES and ACCELS must be positive integers (got NODES=$(NODES) ACCELS=$(ACCELS))))$(if $(filter 1,$(NODES)),,$(error NODES=$(NODES): multi-node is not wired up (accelerate needs every node's --machine_rank and --main_process_ip, which FlexAI does not document for an `accelerate launch` entry point); use NODES=1 with up to 8 ACCELS, see experiments/vlm-grpo/README.md#multi-node))

# `flexai training run` flags shared by flexai-train and flexai-resume, in the seed's order
FLEXAI_RUN_FLAGS = --repository-url $(call q,$(REPO_URL)) $(if $(strip $(REVISION)),--repository-revision $(call q,$(REVISION)) )--requirements-path $(TRAIN_DIR)/requirements.txt --secret $(call q,HF_TOKEN=$(SECRET)) --runtime $(call q,$(RUNTIME)) --nodes $(NODES) --accels $(ACCELS)
# the entry point FlexAI runs on the node: the seed's accelerate launch + grpo_vlm.py arguments, then ARGS
TRAIN_ENTRY = accelerate launch --config_file=$(ACCEL_CONFIG) $(if $(filter $(CONFIG_NPROC),$(NPROC)),,--num_processes $(NPROC) )$(TRAIN_DIR)/grpo_vlm.py --model_name_or_path $(call q,$(MODEL)) --output_dir $(call q,$(OUTPUT)) --learning_rate 1e-5 --gradient_checkpointing --dtype bfloat16 --max_prompt_length 2048 --max_completion_length 1024 --use_vllm --vllm_mode colocate --use_peft --lora_target_modules "q_proj" "v_proj" --log_completions --logging_steps 200$(if $(strip $(ARGS)), $(ARGS))

.PHONY: help info venv vllm-cpu smoke test flexai-connect flexai-secret flexai-train flexai-resume flexai-inspect \
        flexai-logs flexai-checkpoints flexai-fetch docker-build local-smoke merge eval bench plot infer learning-demo

help: ## list targets and knobs (this text)
	@echo 'Usage: make TARGET [KNOB=value ...]    e.g. make flexai-train ACCELS=4'
	@echo
	@echo 'Targets:'
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-20s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))
	@echo
	@echo 'Knobs (default in brackets; `make info` shows the resolved values):'
	@awk '/^## [A-Z_]+: / {name = $$2; sub(/:$$/, "", name); desc = $$0; sub(/^## [A-Z_]+: /, "", desc); next} \
	     name != "" && index($$0, name " ?=") == 1 {val = substr($$0, length(name) + 4); sub(/^ +/, "", val); \
	     printf "  %-20s %s [%s]\n", name, desc, val} {name = ""}' $(firstword $(MAKEFILE_LIST))

info: ## print every knob's resolved value and the command flexai-train would run
	@echo 'Knobs:'
	@$(foreach k,$(KNOBS),printf '  %-16s %s\n' '$(k)' $(call q,$($(k)));)
	@echo
	@echo 'Derived:'
	@printf '  %-16s %s\n' 'processes' $(call q,$(NPROC) ($(NODES) node(s) x $(ACCELS) GPU(s); $(ACCEL_CONFIG) says $(CONFIG_NPROC)))
	@printf '  %-16s %s\n' 'HF_TOKEN' $(call q,from FlexAI secret "$(SECRET)" (value never read by make))
	@echo
	@echo 'make flexai-train runs:'
	@printf '  %s\n' $(call q,$(FLEXAI) training run $(call q,$(NAME)) $(FLEXAI_RUN_FLAGS) -- $(TRAIN_ENTRY))

$(STAMP): code/vlm-grpo/requirements.txt code/vlm-grpo/requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -r $(REQS)
	touch $@

venv: $(STAMP) ## create $(VENV) with the pinned CPU stack (torch 2.8.0 + the runtime pins)

# vLLM has no CPU wheel on PyPI: build 0.11.0 from its sdist against the venv's torch (cached in WHEEL_DIR), install
# it without its deps (they would swap torch for 2.8.0+cpu), then its runtime pins together with the project's.
# Not Linux x86-64: one line says so and set-up goes on (smoke and the tests then generate with transformers).
$(VLLM_STAMP): $(STAMP) scripts/build_vllm_cpu.py code/vlm-grpo/requirements-vllm-cpu.txt
	$(VPY) scripts/build_vllm_cpu.py --wheel-dir $(WHEEL_DIR) --install $(REQS) code/vlm-grpo/requirements-vllm-cpu.txt
	touch $@

vllm-cpu: $(VLLM_STAMP) ## build vLLM 0.11.0 for CPU from PyPI's sdist (once; cached in WHEEL_DIR) and install it into $(VENV)

smoke: $(STAMP) $(if $(filter 0,$(SMOKE_VLLM)),,$(VLLM_STAMP)) ## the seed command offline: tiny Qwen2.5-VL, synthetic data, vLLM colocate, 2-process ZeRO-3 on CPU
	VPY=$(VPY) SMOKE_DIR=$(SMOKE_DIR) SMOKE_STEPS=$(SMOKE_STEPS) SMOKE_VLLM=$(SMOKE_VLLM) SMOKE_ARGS='$(SMOKE_ARGS)' bash scripts/smoke.sh

test: $(STAMP) $(VLLM_STAMP) ## run the test suite on CPU (everything but `gpu`-marked tests), vLLM colocate included
	$(VPY) -m pytest $(PYTEST_ARGS)

# ---- FlexAI ------------------------------------------------------------------------------------------------
flexai-connect: ## connect FlexAI to GitHub (once per account), so jobs can clone REPO_URL
	$(require-flexai)
	$(FLEXAI) code-registry connect

flexai-secret: ## create secret SECRET: the CLI prompts for your HF token (never on a command line)
	$(require-flexai)
	$(FLEXAI) secret create $(call q,$(SECRET))

flexai-train: ## start the GRPO training job: the seed's command, with NAME/MODEL/ACCELS/ARGS... applied
	$(require-flexai)$(require-counts)
	$(FLEXAI) training run $(call q,$(NAME)) $(FLEXAI_RUN_FLAGS) -- $(TRAIN_ENTRY)

flexai-resume: ## start job RESUME_NAME from checkpoint CKPT; grpo_vlm.py resumes from its trainer state
	$(require-ckpt)$(require-flexai)$(require-counts)
	$(FLEXAI) training run $(call q,$(RESUME_NAME)) $(FLEXAI_RUN_FLAGS) --checkpoint $(call q,$(CKPT)) -- $(TRAIN_ENTRY)

flexai-inspect: ## status and life-cycle events of job NAME
	$(require-flexai)
	$(FLEXAI) training inspect $(call q,$(NAME))

flexai-logs: ## logs of job NAME
	$(require-flexai)
	$(FLEXAI) training logs $(call q,$(NAME))

flexai-checkpoints: ## list the checkpoints job NAME produced (their IDs go in CKPT=)
	$(require-flexai)
	$(FLEXAI) training checkpoints $(call q,$(NAME))

flexai-fetch: ## download checkpoint CKPT (a LoRA adapter) into the current folder
	$(require-ckpt)$(require-flexai)
	$(FLEXAI) checkpoint fetch $(call q,$(CKPT))

# ---- after training: merge, evaluate, plot, infer ---------------------------------------------------------------
merge: $(STAMP) ## merge a fetched LoRA adapter into its base model (scripts/merge_lora.py MERGE_ARGS)
	$(VPY) scripts/merge_lora.py $(MERGE_ARGS)

eval: $(STAMP) ## score base vs trained model on held-out questions with the reward functions (scripts/evaluate.py EVAL_ARGS)
	$(VPY) scripts/evaluate.py $(EVAL_ARGS)

plot: $(STAMP) ## PNG of a run's rewards, accuracy, format, length, clip ratio, entropy (scripts/plot_training.py PLOT_ARGS)
	$(VPY) scripts/plot_training.py $(PLOT_ARGS)

infer: $(STAMP) ## answer one question about one image with a (merged) model (scripts/infer.py INFER_ARGS)
	$(VPY) scripts/infer.py $(INFER_ARGS)

learning-demo: $(STAMP) ## offline proof that GRPO helps: tiny model, synthetic task, CPU; writes DEMO_FIGURE (under outputs/)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VPY) scripts/learning_demo.py --out_dir $(call q,$(DEMO_DIR)) --figure $(call q,$(DEMO_FIGURE))

bench: ## GPU benchmark: seed vs tuned GRPO steps on the 3B architecture (experiments/vlm-grpo/BENCHMARKS.md)
	$(BENCH_PYTHON) scripts/bench.py $(BENCH_ARGS)

# ---- Docker: the FlexAI runtime, locally -------------------------------------------------------------------
docker-build: ## build IMAGE from docker/Dockerfile: the runtime's torch 2.8.0 + CUDA 12.8 + vLLM 0.11.0
	$(require-docker)
	$(DOCKER) build -f docker/Dockerfile -t $(call q,$(IMAGE)) .

local-smoke: docker-build ## `make smoke` inside the image; with GPUs (DOCKER_GPUS) also vLLM colocate
	$(require-docker)
	mkdir -p $(call q,$(LOCAL_SMOKE_DIR))
	$(DOCKER) run --rm --ipc=host $(if $(strip $(DOCKER_GPUS)),--gpus $(call q,$(DOCKER_GPUS)) -e SMOKE_VLLM=1,-e SMOKE_VLLM=0) -e SMOKE_STEPS=$(SMOKE_STEPS) -v $(call q,$(abspath $(LOCAL_SMOKE_DIR))):/workspace/outputs/smoke $(call q,$(IMAGE))
