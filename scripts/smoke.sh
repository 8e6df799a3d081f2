#!/usr/bin/env bash
# Offline smoke run of the seed recipe: the seed's flags, with only the model (a tiny random Qwen2.5-VL built here),
# the dataset (`synthetic`), the output dir and the step count swapped. 2 ZeRO-3 processes through the project's
# accelerate config; on a CUDA host one process per GPU (at most 2), and with SMOKE_VLLM=1 vLLM colocate generation.
# Last line of output: the path of the saved LoRA adapter.
# Env: VPY (python, default .venv/bin/python), SMOKE_DIR (default outputs/smoke), SMOKE_STEPS (default 4),
#      SMOKE_VLLM (1: add --use_vllm --vllm_mode colocate), SMOKE_ARGS (extra script arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=${VPY:-.venv/bin/python}
SMOKE_DIR=${SMOKE_DIR:-outputs/smoke}
SMOKE_STEPS=${SMOKE_STEPS:-4}
MODEL="$SMOKE_DIR/tiny-qwen2.5-vl"
RUN="$SMOKE_DIR/run"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

[ -f "$MODEL/config.json" ] || "$VPY" scripts/make_tiny_model.py "$MODEL" >/dev/null
rm -rf "$RUN"  # a smoke run starts fresh (the script would otherwise resume from the last checkpoint)

gpus=$("$VPY" -c 'import torch; print(torch.cuda.device_count())')
procs=2
if [ "$gpus" -gt 0 ] && [ "$gpus" -lt 2 ]; then procs=$gpus; fi
launch=(--config_file=code/vlm-grpo/deepspeed_zero3.yaml)
[ "$procs" -ne 2 ] && launch+=(--num_processes "$procs")
vllm=()
if [ "${SMOKE_VLLM:-0}" = 1 ]; then
  [ "$gpus" -gt 0 ] || { echo "SMOKE_VLLM=1 needs a GPU (vLLM has no CPU path here)" >&2; exit 2; }
  vllm=(--use_vllm --vllm_mode colocate --vllm_gpu_memory_utilization 0.2)
fi

log="$SMOKE_DIR/smoke.log"
mkdir -p "$SMOKE_DIR"
# shellcheck disable=SC2086
"$VPY" -m accelerate.commands.launch "${launch[@]}" \
    code/vlm-grpo/grpo_vlm.py \
    --model_name_or_path "$MODEL" \
    --dataset_name synthetic \
    --output_dir "$RUN" \
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
    ${SMOKE_ARGS:-} 2>&1 | tee "$log" | grep --line-buffered -E "dataset:|plan:|train_runtime|saved:|Error|error" || true
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || { echo "smoke run failed (exit $status); full log: $log" >&2; exit "$status"; }
adapter="$RUN/adapter_model.safetensors"
[ -s "$adapter" ] || { echo "no adapter at $adapter; full log: $log" >&2; exit 1; }
echo "$adapter"
