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
## WHEEL_DIR: cache of the vLLM 0.11.0 CPU wheel set-up builds, shared by every clone here (skips the 146 s build)
WHEEL_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/vlm-grpo/vllm-0.11.0-cpu-torch-2.8.0
## SMOKE_ARGS: extra grpo_vlm.py flags for the smoke run, e.g. SMOKE_ARGS="--reward_funcs digit_ratio"
SMOKE_ARGS ?=
## PYTEST_ARGS: extra pytest arguments, e.g. PYTEST_ARGS="-k rewards -x"
PYTEST_ARGS ?= 
## TEST_WORKERS: pytest-xdist workers of `make test` (tests/conftest.py); 0: one process, for -s or --pdb
TEST_WORKERS ?= 2

# ---- FlexAI training (the seed's `flexai training run`; experiments/vlm-grpo/README.md) ------------
## FLEXAI: the FlexAI CLI (https://docs.flex.ai/cli/); log in once with `flexai auth login`
FLEXAI ?= flexai
## NAME: training job name; inspect/logs/checkpoints act on it
NAME ?= vlm-grpo-training
## RESUME_NAME: job name of `make flexai-resume` (a FlexAI job name can be used once)
RESUME_NAME ?= $(NAME)-resume
## SECRET: name (not value) of the FlexAI secret holding your Hugging Face token, exported as HF_TOKEN
SECRET ?= hf-token
## REPO_URL: repository FlexAI clones for the job, not this working copy: your fork once you change anything
REPO_URL ?= https://github.com/flexaihq/blueprints
## REVISION: branch, tag or commit of REPO_URL the job runs; empty: its default branch
REVISION ?=
## RUNTIME: FlexAI runtime image (torch 2.8.0, CUDA 12.8, vLLM 0.11.0; docker/Dockerfile mirrors it)
RUNTIME ?= pytorch-28-vllm-0110-nvidia
## NODES: nodes of the job; 1: the seed's `accelerate launch`; >1: FlexAI's torchrun on each node, ZeRO-3 from the JSON (experiments/vlm-grpo/README.md#multi-node)
NODES ?= 1
## ACCELS: GPUs per node; one training process per GPU
ACCELS ?= 2
## MODEL: base VLM on the Hugging Face Hub
MODEL ?= Qwen/Qwen2.5-VL-3B-Instruct
## OUTPUT: --output_dir of the job; FlexAI captures checkpoints written under /output-checkpoint
OUTPUT ?= /output-checkpoint/grpo-$(notdir $(MODEL))
## ARGS: extra grpo_vlm.py flags, appended last so they win, e.g. ARGS="--max_steps 50 --save_steps 25 --logging_steps 5"
ARGS ?=
## CKPT: FlexAI checkpoint ID (from `make flexai-checkpoints`) for flexai-resume and flexai-fetch
CKPT ?=
## DEST: local folder flexai-fetch downloads checkpoint CKPT into (merge/eval/plot then read it)
DEST ?= outputs/checkpoints/$(CKPT)
## DATASET: FlexAI dataset name (`make flexai-dataset-push`): the job mounts it at /input/DATASET and trains on it
DATASET ?=
## DIR: local dataset folder for flexai-dataset-push (parquet files, jsonl with image paths, or a save_to_disk folder)
DIR ?=
## WANDB_SECRET: name (not value) of a FlexAI secret holding a W&B API key; set: WANDB_API_KEY from it and --report_to wandb
WANDB_SECRET ?=
## ENV: extra environment variables of the job, "K=V K2=V2" (each becomes --env K=V); secrets go in FlexAI secrets
ENV ?=
## MERGED: folder of the merged model (make merge writes it) that flexai-checkpoint-push uploads
MERGED ?= outputs/merged
## CKPT_NAME: name of the merged model's FlexAI checkpoint (flexai-checkpoint-push, flexai-serve)
CKPT_NAME ?= $(NAME)-merged
## ENDPOINT: name of the FlexAI inference endpoint flexai-serve starts and flexai-serve-delete deletes
ENDPOINT ?= $(NAME)-endpoint
## MERGE_ARGS: arguments of scripts/merge_lora.py for `make merge` (its docstring shows them; "--help" lists them)
MERGE_ARGS ?=
## BENCH_PYTHON: interpreter of `make bench`: the GPU machine's own (CUDA torch), not the CPU-only $(VENV)
BENCH_PYTHON ?= python3
## BENCH_ARGS: arguments of scripts/bench.py, e.g. BENCH_ARGS="--configs seed --steps 2" ("--help" lists them)
BENCH_ARGS ?=
## BENCH_JOB_ARGS: scripts/bench.py arguments of `make flexai-bench` (the benchmark as a FlexAI job, vLLM included)
BENCH_JOB_ARGS ?= --configs seed-trl,seed,tuned-trl,tuned --warmup 2 --steps 3 --skip_vision --timeout_s 900
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
# uv installs the pins into the venv: the same PyPI wheels as pip, from its cache in seconds where pip takes ~2 min
# to unpack torch's 4 GB of CUDA wheels again; pinned so set-up resolves the same way on every machine.
# --compile-bytecode: pip writes the .pyc files at install and uv does not; where PYTHONDONTWRITEBYTECODE=1 (CI images
# set it) nothing writes them later, so every process compiled torch/transformers/vLLM again (import 14.6 s, not 7.5 s)
UV_PIN := uv==0.13.9
KNOBS := $(shell awk '/^[A-Z_]+ \?=/ {print $$1}' $(firstword $(MAKEFILE_LIST)))
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-cpu

# ---- derived values (not knobs) -------------------------------------------------------------------------
TRAIN_DIR := code/vlm-grpo
ACCEL_CONFIG := $(TRAIN_DIR)/deepspeed_zero3.yaml
# the ZeRO-3 settings of the torchrun route (NODES>1); tests/test_configs.py proves the yaml builds the same config
DS_CONFIG := $(TRAIN_DIR)/deepspeed_zero3.json
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
require-counts = $(if $(shell [[ "$(NODES)" =~ ^[1-9][0-9]*$$ && "$(ACCELS)" =~ ^[1-9][0-9]*$$ ]] && echo ok),,$(error NODES and ACCELS must be positive integers (got NODES=$(NODES) ACCELS=$(ACCELS))))$(if $(split_problem),$(error $(split_problem)))
require-dataset = $(if $(strip $(DATASET)),,$(error DATASET is not set: the FlexAI dataset name, `make $@ DATASET=<name>$(if $(filter flexai-dataset-push,$@), DIR=<folder>)`))
require-dir = $(if $(strip $(DIR)),,$(error DIR is not set: `make $@ DIR=<folder> DATASET=<name>` (parquet files, jsonl with image paths, or a save_to_disk folder)))
require-venv = $(if $(wildcard $(VPY)),,$(error $(VPY) not found: run `make venv` first (the check uses the training script's own code)))
# ENV words must be K=V; names that look like credentials are refused (their values would sit in the job's spec and
# in `make info`): put those in a FlexAI secret. The message names the variable, never its value.
env_bad = $(strip $(foreach w,$(ENV),$(if $(shell [[ '$(subst ','"'"',$(w))' =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] && echo ok),,$(firstword $(subst =, ,$(w))))))
env_secret = $(strip $(foreach w,$(ENV),$(if $(shell n='$(firstword $(subst =, ,$(w)))'; [[ $${n^^} =~ (^|_)(TOKEN|KEY|SECRET|PASSWORD)(_|$$) ]] && echo y),$(firstword $(subst =, ,$(w))))))
require-env = $(if $(env_bad),$(error ENV must be space-separated K=V words; not one: $(env_bad)))$(if $(env_secret),$(error ENV sets $(env_secret): a credential belongs in a FlexAI secret (`flexai secret create <name>`; W&B: WANDB_SECRET=<name>), not on the job's command line))
# `config.json` with `architectures` is what FlexAI's checkpoint manager marks "inference ready"; merge_lora.py checks
# that, the processor and the chat template, and prints one problem line (nothing when ready)
ready_problem = $(shell $(VPY) scripts/merge_lora.py --check_inference_ready $(call q,$(MERGED)) 2>/dev/null || echo "$(MERGED): the inference-ready check itself failed: run $(VPY) scripts/merge_lora.py --check_inference_ready $(MERGED)")
require-ready = $(require-venv)$(if $(strip $(ready_problem)),$(error $(ready_problem)))
# the script's own loader (code/vlm-grpo/data.py) and column check on DIR: one line saying what is wrong, else nothing
dataset_problem = $(shell $(VPY) -c $$'import sys\nsys.path.insert(0, "$(TRAIN_DIR)")\nfrom data import Columns, DatasetError, check_columns, load_raw_dataset\ntry: check_columns(load_raw_dataset(sys.argv[1], columns=Columns(*sys.argv[2:5])))\nexcept DatasetError as err: print(f"DIR={sys.argv[1]} cannot be pushed: {err}")' $(call q,$(DIR)) $(call q,$(call flag,--image_column,image)) $(call q,$(call flag,--problem_column,problem)) $(call q,$(call flag,--solution_column,solution)) 2>/dev/null || echo "$(DIR): the dataset check itself failed: see $(VPY) -c ... in the Makefile")

# GRPO's batch arithmetic (TRL 1.2.0 GRPOConfig.__post_init__, U8 in experiments/vlm-grpo/INTERNALS.md) checked before any job starts: the
# completions of one generation must split into whole groups of --num_generations, over all NODES x ACCELS processes.
# Flag values are read from ARGS (the last one wins, as in the script), else TRL's defaults.
args_words = $(foreach w,$(ARGS),$(if $(filter --%,$(w)),$(subst =, ,$(w)),$(w)))
after = $(if $2,$(if $(filter $1,$(firstword $2)),$(word 2,$2) $(call after,$1,$(wordlist 3,999,$2)),$(call after,$1,$(wordlist 2,999,$2))))
flag = $(or $(lastword $(call after,$1,$(args_words))),$2)
split_problem = $(shell per=$(call flag,--per_device_train_batch_size,8); acc=$(call flag,--gradient_accumulation_steps,1); \
  spg=$(call flag,--steps_per_generation,$$acc); gens=$(call flag,--num_generations,8); gbs=$(call flag,--generation_batch_size,); \
  tp=$(call flag,--vllm_tensor_parallel_size,1); n=$(NPROC); \
  for v in $$per $$acc $$spg $$gens $$tp $$gbs; do [[ $$v =~ ^[1-9][0-9]*$$ ]] || exit 0; done; \
  if [ -n "$$gbs" ]; then \
    (( gbs % (per * n) )) && { echo "--generation_batch_size $$gbs is not a multiple of --per_device_train_batch_size $$per x $$n processes (NODES=$(NODES) x ACCELS=$(ACCELS)): TRL refuses it; change ARGS or ACCELS"; exit 0; }; \
  else gbs=$$(( per * n * spg )); fi; \
  (( gbs % gens )) && { echo "NODES=$(NODES) x ACCELS=$(ACCELS) = $$n processes x --per_device_train_batch_size $$per x $$spg step(s) per generation = $$gbs completions per generation, not a multiple of --num_generations $$gens (TRL's GRPOConfig rule, trl#3020): pick ACCELS or ARGS so that it is"; exit 0; }; \
  (( n % tp )) && echo "--vllm_tensor_parallel_size $$tp does not divide the $$n processes (NODES=$(NODES) x ACCELS=$(ACCELS)): vLLM colocate groups processes by it"; true)

# how to call an endpoint (printed by flexai-serve and flexai-endpoint): the key stays in the environment. FlexAI prints
# an endpoint's API key when `flexai inference serve` creates it, and `flexai inference inspect` shows its URL (as in
# FlexAI's own blueprints, flexaihq/blueprints experiments/text-to-audio-qwen3-tts/README.md)
define endpoint-howto
echo; echo 'Endpoint $(ENDPOINT): its API key is printed once, by `make flexai-serve` (above when you just ran it); `make flexai-endpoint`'; \
echo 'shows its status. Once it runs, put the key and its URL in the environment (read from there, never printed) and ask it:'; \
echo '  read -rs FLEXAI_API_KEY && export FLEXAI_API_KEY   # paste the API key (not echoed, not in your shell history)'; \
echo '  export ENDPOINT_URL=$$(make -s flexai-endpoint-url)'; \
echo '  make infer INFER_ARGS="--endpoint $$ENDPOINT_URL --image experiments/vlm-grpo/samples/number.png --question '"'"'What number is written in the image?'"'"'"'; \
echo '  curl -s $$ENDPOINT_URL/v1/models -H "Authorization: Bearer $$FLEXAI_API_KEY"   # the served model name'; \
echo '  python -c "import os; from openai import OpenAI; c = OpenAI(base_url=os.environ[\"ENDPOINT_URL\"] + \"/v1\", api_key=os.environ[\"FLEXAI_API_KEY\"]); print(c.models.list())"'; \
echo 'An endpoint costs while it runs: make flexai-serve-delete deletes it.'
endef

# FlexAI clones REPO_URL at REVISION, never this working copy. Warn (one line on stderr; the job still starts) when the
# working copy holds what that revision cannot contain: uncommitted or untracked files, a HEAD commit that is not on
# the branch REVISION names (or REPO_URL's default branch), or no remote at REPO_URL at all. Offline: compared with the
# remote-tracking branches as last fetched (`git fetch` first for a fresh answer). Silent outside a git checkout.
define code-check
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || exit 0; \
norm() { local u="$${1%/}"; u="$${u%.git}"; u="$${u#git@github.com:}"; u="$${u#ssh://git@github.com/}"; u="$${u#https://github.com/}"; u="$${u#http://github.com/}"; echo "$${u,,}"; }; \
url=$(call q,$(REPO_URL)); rev=$(call q,$(REVISION)); want=$$(norm "$$url"); remote=; target=; problems=; \
for r in $$(git remote); do [ "$$(norm "$$(git remote get-url "$$r")")" = "$$want" ] && { remote=$$r; break; }; done; \
n=$$(git status --porcelain --untracked-files=normal | wc -l); \
[ "$$n" -gt 0 ] && problems="$$problems; $$n uncommitted or untracked file(s) (git status)"; \
if [ -z "$$remote" ]; then problems="$$problems; no remote of it is REPO_URL (git remote -v)"; \
elif [ -z "$$rev" ]; then target=$$(git symbolic-ref -q --short "refs/remotes/$$remote/HEAD") || problems="$$problems; the default branch of $$remote is unknown here (git remote set-head $$remote --auto)"; \
elif git rev-parse -q --verify "refs/remotes/$$remote/$$rev^{commit}" >/dev/null; then target=$$remote/$$rev; \
elif git rev-parse -q --verify "refs/heads/$$rev" >/dev/null; then target=refs/heads/$$rev; \
  problems="$$problems; branch $$rev is not on $$remote as last fetched (git push $$remote $$rev)"; \
elif c=$$(git rev-parse -q --verify "$$rev^{commit}"); then target=$$c; \
  [ -n "$$(git branch -r --contains "$$c" --list "$$remote/*")" ] || problems="$$problems; REVISION=$$rev is on no branch of $$remote as last fetched (git push)"; \
else problems="$$problems; REVISION=$$rev is neither a branch of $$remote as last fetched nor a commit here"; fi; \
if [ -n "$$target" ] && ! git merge-base --is-ancestor HEAD "$$target" 2>/dev/null; then problems="$$problems; commit $$(git rev-parse --short HEAD) is not in $$target as last fetched (git push)"; fi; \
[ -z "$$problems" ] || echo "warning: the job runs $$url at $${rev:-its default branch}, not this working copy: $${problems#; }. Push your changes (to a fork if you cannot push here) and set REPO_URL and REVISION to them; make info shows both" >&2
endef

# `flexai training run` flags shared by flexai-train and flexai-resume, in the seed's order; DATASET, WANDB_SECRET and
# ENV add theirs after the seed's only when set, so the default command stays the seed's token for token
FLEXAI_RUN_FLAGS = --repository-url $(call q,$(REPO_URL)) $(if $(strip $(REVISION)),--repository-revision $(call q,$(REVISION)) )--requirements-path $(TRAIN_DIR)/requirements.txt --secret $(call q,HF_TOKEN=$(SECRET)) --runtime $(call q,$(RUNTIME)) --nodes $(NODES) --accels $(ACCELS)$(if $(strip $(DATASET)), --dataset $(call q,$(DATASET)))$(if $(strip $(WANDB_SECRET)), --secret $(call q,WANDB_API_KEY=$(WANDB_SECRET)))$(if $(strip $(ENV)), $(foreach e,$(ENV),--env $(call q,$(e))))
# grpo_vlm.py's arguments: the seed's, then what the knobs add, then ARGS (last, so a repeated flag wins)
SCRIPT_ARGS = --model_name_or_path $(call q,$(MODEL)) --output_dir $(call q,$(OUTPUT)) --learning_rate 1e-5 --gradient_checkpointing --dtype bfloat16 --max_prompt_length 2048 --max_completion_length 1024 --use_vllm --vllm_mode colocate --use_peft --lora_target_modules "q_proj" "v_proj" --log_completions --logging_steps 200$(if $(strip $(DATASET)), --dataset_name $(call q,/input/$(DATASET)))$(if $(strip $(WANDB_SECRET)), --report_to wandb)$(if $(strip $(RESUME_FLAGS)), $(RESUME_FLAGS))$(if $(strip $(ARGS)), $(ARGS))
# the entry point FlexAI runs. One node: the seed's `accelerate launch` with the ZeRO-3 yaml. Several nodes: the bare
# script, which FlexAI's CLI launches with torchrun on every node (torchrun reads no accelerate yaml, so the same
# ZeRO-3 settings reach the trainer as `--deepspeed` JSON; accelerate would need each node's rank and master address,
# which FlexAI does not document for an accelerate entry point)
TRAIN_ENTRY = $(if $(filter 1,$(NODES)),accelerate launch --config_file=$(ACCEL_CONFIG) $(if $(filter $(CONFIG_NPROC),$(NPROC)),,--num_processes $(NPROC) )$(TRAIN_DIR)/grpo_vlm.py,$(TRAIN_DIR)/grpo_vlm.py --deepspeed $(DS_CONFIG)) $(SCRIPT_ARGS)
# what the job's entry says on flexai-resume: resume or fail (never a silent fresh start), set on that target only
RESUME_FLAGS =

.PHONY: help info venv vllm-cpu smoke test .dry-run-checks dry-run learning-demo flexai-connect flexai-secret flexai-train \
        flexai-inspect flexai-logs flexai-checkpoints flexai-stop flexai-resume flexai-fetch flexai-dataset-push merge \
        eval plot infer flexai-checkpoint-push flexai-serve flexai-endpoint flexai-endpoint-url \
        flexai-serve-delete bench flexai-bench \
        docker-build local-smoke

# `make help` prints the targets under their `##@ ` group lines, in file order; [paid] marks targets that start
# FlexAI GPUs (a job or an endpoint)
##@ Start here
help: ## list targets and knobs (this text)
	@echo 'Usage: make TARGET [KNOB=value ...]    e.g. make flexai-train ACCELS=4'
	@awk 'BEGIN {FS = ":.*## "} /^##@ / {printf "\n%s:\n", substr($$0, 5); next} \
	     /^[a-zA-Z0-9_-]+:.*## / {printf "  %-23s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))
	@echo
	@echo 'Knobs (default in brackets; `make info` shows the resolved values):'
	@awk '/^## [A-Z_]+: / {name = $$2; sub(/:$$/, "", name); desc = $$0; sub(/^## [A-Z_]+: /, "", desc); next} \
	     name != "" && index($$0, name " ?=") == 1 {val = substr($$0, length(name) + 4); sub(/^ +/, "", val); \
	     printf "  %-23s %s [%s]\n", name, desc, val} {name = ""}' $(firstword $(MAKEFILE_LIST))

info: ## the command flexai-train would run, the code it runs (REPO_URL at REVISION), every knob's resolved value
	$(require-env)@echo 'make flexai-train runs:'
	@printf '  %s\n' $(call q,$(FLEXAI) training run $(call q,$(NAME)) $(FLEXAI_RUN_FLAGS) -- $(TRAIN_ENTRY))
	@echo
	@echo 'Code the job runs: FlexAI clones REPO_URL at REVISION, not this working copy:'
	@printf '  %s\n' $(call q,$(REPO_URL) at $(or $(REVISION),its default branch))
	@$(code-check)
	@echo
	@echo 'Derived:'
	@printf '  %-16s %s\n' 'processes' $(call q,$(NPROC) ($(NODES) node(s) x $(ACCELS) GPU(s); $(ACCEL_CONFIG) says $(CONFIG_NPROC)))
	@printf '  %-16s %s\n' 'launcher' $(call q,$(if $(filter 1,$(NODES)),accelerate launch with $(ACCEL_CONFIG) (the seed's),FlexAI's torchrun on each of the $(NODES) nodes ($(ACCELS) processes each) running the bare script; ZeRO-3 from $(DS_CONFIG) via --deepspeed))
	@printf '  %-16s %s\n' 'dataset' $(call q,$(if $(strip $(DATASET)),FlexAI dataset "$(DATASET)" mounted at /input/$(DATASET) (--dataset_name),--dataset_name default of grpo_vlm.py (or ARGS)))
	@printf '  %-16s %s\n' 'report_to' $(call q,$(if $(strip $(WANDB_SECRET)),wandb (WANDB_API_KEY from FlexAI secret "$(WANDB_SECRET)"),none (grpo_vlm.py's default; WANDB_SECRET=<name> for W&B)))
	@printf '  %-16s %s\n' 'HF_TOKEN' $(call q,from FlexAI secret "$(SECRET)" (value never read by make))
	@echo
	@echo 'Knobs:'
	@$(foreach k,$(KNOBS),printf '  %-16s %s\n' '$(k)' $(call q,$($(k)));)

$(STAMP): code/vlm-grpo/requirements.txt code/vlm-grpo/requirements-dev.txt
	@echo 'set-up: creating $(VENV) with the pinned stack (once; several GB of disk: README.md, "Set-up")'
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(UV_PIN)
	$(VPY) -m uv pip install --compile-bytecode -r $(REQS) --python $(VPY)
	touch $@

# vLLM has no CPU wheel on PyPI: build 0.11.0 from its sdist against the venv's torch (cached in WHEEL_DIR), install
# it without its deps (they would swap torch for 2.8.0+cpu), then its runtime pins together with the project's.
# Not Linux x86-64: one line says so and set-up goes on (smoke and the tests then generate with transformers).
$(VLLM_STAMP): $(STAMP) scripts/build_vllm_cpu.py code/vlm-grpo/requirements-vllm-cpu.txt
	$(VPY) scripts/build_vllm_cpu.py --wheel-dir $(WHEEL_DIR) --install $(REQS) code/vlm-grpo/requirements-vllm-cpu.txt
	touch $@

##@ Local, free (CPU; the first target that needs it builds .venv)
venv: $(STAMP) ## create $(VENV) with the pinned CPU stack (torch 2.8.0 + the runtime pins)

vllm-cpu: $(VLLM_STAMP) ## build vLLM 0.11.0 for CPU from PyPI's sdist (once; cached in WHEEL_DIR) and install it into $(VENV)

smoke: $(STAMP) $(if $(filter 0,$(SMOKE_VLLM)),,$(VLLM_STAMP)) ## the seed command offline: tiny Qwen2.5-VL, synthetic data, vLLM colocate, 2-process ZeRO-3 on CPU
	VPY=$(VPY) SMOKE_DIR=$(SMOKE_DIR) SMOKE_STEPS=$(SMOKE_STEPS) SMOKE_VLLM=$(SMOKE_VLLM) SMOKE_ARGS='$(SMOKE_ARGS)' bash scripts/smoke.sh

test: $(STAMP) $(VLLM_STAMP) ## run the test suite on CPU (everything but `gpu`-marked tests), vLLM colocate included
	$(VPY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

# made before $(STAMP) (prerequisites are made left to right): a wrong knob costs no set-up
.dry-run-checks:
	$(require-counts)$(require-env)$(if $(filter 1,$(NODES)),,$(error NODES=$(NODES): dry-run starts the job's processes on this machine; check the plan of N processes with NODES=1 ACCELS=N))
	@:

# the job's own entry (TRAIN_ENTRY, knobs applied) run here with --dry_run: accelerate starts the job's processes on
# this machine, each checks arguments, data and batch arithmetic and prints the plan; no weights load. DIR, when set,
# stands in for the FlexAI dataset (/input/DATASET exists only in the job).
dry-run: .dry-run-checks $(STAMP) ## check the job before paying: its entry with --dry_run here (arguments, every data row, steps for its process count; no weights)
	PATH=$(call q,$(abspath $(VENV))/bin):"$$PATH" $(TRAIN_ENTRY) --dry_run$(if $(strip $(DIR)), --dataset_name $(call q,$(DIR)))

learning-demo: $(STAMP) ## offline check that GRPO moves a policy towards its reward (tiny random model, digit_ratio, CPU): not answer quality; writes DEMO_FIGURE
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VPY) scripts/learning_demo.py --out_dir $(call q,$(DEMO_DIR)) --figure $(call q,$(DEMO_FIGURE))

##@ FlexAI training ([paid]: starts GPUs; FlexAI clones REPO_URL at REVISION)
flexai-connect: ## connect FlexAI to GitHub (once per account), so jobs can clone REPO_URL
	$(require-flexai)
	$(FLEXAI) code-registry connect

flexai-secret: ## create secret SECRET: the CLI prompts for your HF token (never on a command line)
	$(require-flexai)
	$(FLEXAI) secret create $(call q,$(SECRET))

flexai-train: ## [paid] start job NAME: the seed's command, with MODEL/NODES/ACCELS/DATASET/ARGS... applied
	$(require-flexai)$(require-counts)$(require-env)
	@$(code-check)
	$(FLEXAI) training run $(call q,$(NAME)) $(FLEXAI_RUN_FLAGS) -- $(TRAIN_ENTRY)

flexai-inspect: ## status and life-cycle events of job NAME
	$(require-flexai)
	$(FLEXAI) training inspect $(call q,$(NAME))

flexai-logs: ## logs of job NAME
	$(require-flexai)
	$(FLEXAI) training logs $(call q,$(NAME))

flexai-checkpoints: ## list the checkpoints job NAME produced (their IDs go in CKPT=)
	$(require-flexai)
	$(FLEXAI) training checkpoints $(call q,$(NAME))

flexai-stop: ## stop job NAME (`flexai training stop`: FlexAI documents user stops, its CLI page was not checked here)
	$(require-flexai)
	$(FLEXAI) training stop $(call q,$(NAME))

flexai-resume: RESUME_FLAGS = --resume require
flexai-resume: ## [paid] start job RESUME_NAME from checkpoint CKPT; grpo_vlm.py resumes from its trainer state (or fails)
	$(require-ckpt)$(require-flexai)$(require-counts)$(require-env)
	@$(code-check)
	$(FLEXAI) training run $(call q,$(RESUME_NAME)) $(FLEXAI_RUN_FLAGS) --checkpoint $(call q,$(CKPT)) -- $(TRAIN_ENTRY)

flexai-fetch: ## download checkpoint CKPT (a LoRA adapter, or bench.json of flexai-bench) into folder DEST
	$(require-ckpt)$(require-flexai)
	$(FLEXAI) checkpoint fetch $(call q,$(CKPT)) --destination $(call q,$(DEST))

flexai-dataset-push: ## check that DIR loads with the script's loader, then push it as FlexAI dataset DATASET
	$(require-dataset)$(require-dir)$(require-flexai)$(require-venv)$(if $(strip $(dataset_problem)),$(error $(dataset_problem)))
	$(FLEXAI) dataset push $(call q,$(DATASET)) --file $(call q,$(DIR))

##@ After training (local, in .venv; merge and eval download the base model once)
merge: $(STAMP) ## merge a fetched LoRA adapter into its base model (scripts/merge_lora.py MERGE_ARGS)
	$(VPY) scripts/merge_lora.py $(MERGE_ARGS)

eval: $(STAMP) ## score base vs trained model on held-out questions with the reward functions (scripts/evaluate.py EVAL_ARGS)
	$(VPY) scripts/evaluate.py $(EVAL_ARGS)

plot: $(STAMP) ## PNG of a run's rewards, accuracy, format, length, clip ratio, entropy (scripts/plot_training.py PLOT_ARGS)
	$(VPY) scripts/plot_training.py $(PLOT_ARGS)

infer: $(STAMP) ## answer one question about one image with a merged model or an endpoint (scripts/infer.py INFER_ARGS)
	$(VPY) scripts/infer.py $(INFER_ARGS)

##@ Serving on FlexAI
flexai-checkpoint-push: ## check that MERGED is inference ready, then push it as FlexAI checkpoint CKPT_NAME
	$(require-flexai)$(require-ready)
	$(FLEXAI) checkpoint push $(call q,$(CKPT_NAME)) --file $(call q,$(MERGED))

flexai-serve: ## [paid] serve checkpoint CKPT_NAME as endpoint ENDPOINT (vLLM on FlexAI; prints its API key), then say how to call it
	$(require-flexai)
	$(FLEXAI) inference serve $(call q,$(ENDPOINT)) --checkpoint $(call q,$(CKPT_NAME))
	@$(endpoint-howto)

flexai-endpoint: ## status and URL of endpoint ENDPOINT, and ready-to-paste client lines
	$(require-flexai)
	$(FLEXAI) inference inspect $(call q,$(ENDPOINT))
	@$(endpoint-howto)

# the URL alone, for `export ENDPOINT_URL=$(make -s flexai-endpoint-url)`: `inspect -j` and its config.endpointUrl
# field as FlexAI's own blueprints read them (flexaihq/blueprints experiments/text-to-audio-qwen3-tts/README.md)
flexai-endpoint-url: ## print the URL of endpoint ENDPOINT alone (the guide exports it as ENDPOINT_URL)
	$(require-flexai)
	@set -o pipefail; $(FLEXAI) inference inspect $(call q,$(ENDPOINT)) -j | $(PYTHON) -c 'import json, sys; print(json.load(sys.stdin)["config"]["endpointUrl"])'

flexai-serve-delete: ## delete endpoint ENDPOINT (`flexai inference delete`: not in the CLI pages checked here)
	$(require-flexai)
	$(FLEXAI) inference delete $(call q,$(ENDPOINT))

##@ Benchmarks
bench: ## GPU benchmark on this machine: seed vs tuned GRPO steps on the 3B architecture (experiments/vlm-grpo/BENCHMARKS.md)
	$(BENCH_PYTHON) scripts/bench.py $(BENCH_ARGS)

# bench.py launches each configuration itself (accelerate, ZeRO-3 over the job's GPUs), so the entry is a command, not
# a bare script; bench.json/bench.md are copied into FLEXAI_OUTPUT_CHECKPOINT_DIR, i.e. a checkpoint of the job
flexai-bench: ## [paid] the benchmark as a FlexAI job on RUNTIME (vLLM generating); bench.json lands in its checkpoint (flexai-fetch)
	$(require-flexai)$(require-counts)$(require-env)$(if $(filter 1,$(NODES)),,$(error NODES=$(NODES): the benchmark runs on one node (its configurations are launched by bench.py itself); use NODES=1))
	@$(code-check)
	$(FLEXAI) training run $(call q,$(NAME)-bench) $(FLEXAI_RUN_FLAGS) -- python3 scripts/bench.py --out /tmp/bench $(BENCH_JOB_ARGS)

##@ Docker: the FlexAI runtime, locally (docker/Dockerfile)
docker-build: ## build IMAGE from docker/Dockerfile: the runtime's torch 2.8.0 + CUDA 12.8 + vLLM 0.11.0
	$(require-docker)
	$(DOCKER) build -f docker/Dockerfile -t $(call q,$(IMAGE)) .

local-smoke: docker-build ## `make smoke` inside the image; with GPUs (DOCKER_GPUS) also vLLM colocate
	$(require-docker)
	mkdir -p $(call q,$(LOCAL_SMOKE_DIR))
	$(DOCKER) run --rm --ipc=host $(if $(strip $(DOCKER_GPUS)),--gpus $(call q,$(DOCKER_GPUS)) -e SMOKE_VLLM=1,-e SMOKE_VLLM=0) -e SMOKE_STEPS=$(SMOKE_STEPS) -v $(call q,$(abspath $(LOCAL_SMOKE_DIR))):/workspace/outputs/smoke $(call q,$(IMAGE))
