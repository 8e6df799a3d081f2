"""The LoRA gradients of one GRPO step under 2-process ZeRO-3 with gradient checkpointing (the M1 fix of zero3.py in
force) equal those of one plain process without checkpointing, on the same fixed batch (tests/zero3_grad_check.py).

Why a gradient comparison: test_train_cpu.py checks that every LoRA weight moved, but Adam's first update has about
the learning rate's size whatever the gradient's magnitude, so a gradient scaled wrongly, or computed from
re-partitioned weights, would pass it. Here the gradient itself is compared, tensor by tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexai_stub import offline_seed_script_args
from test_train_cpu import PYTHON, REPO, launch_cmd, run

pytestmark = pytest.mark.slow

HELPER = "tests/zero3_grad_check.py"

# Both runs are float32 (no bf16 rounding) and differ only in how the same sums are split and ordered: the 2 ranks'
# halves of the batch are reduced by DeepSpeed, the checkpointed layers are recomputed. 1e-4 of a tensor's largest
# gradient is over 100 times the largest difference measured (8.8e-7: experiments/vlm-grpo/cpu-results/
# zero3-gradients.json) and far below what a lost, halved or doubled gradient gives (0.5 or more; reentrant
# checkpointing gives 1.0 on the vision blocks' adapters: zero3-gradients-reentrant.json there).
RELATIVE_TOLERANCE = 1e-4


def grad_check_args(model: Path, output_dir: Path, per_device_batch: int, checkpointing: bool) -> list[str]:
    return [
        *offline_seed_script_args(model, output_dir),
        "--gradient_checkpointing", str(checkpointing).lower(),  # TRL's default is on: the reference turns it off
        "--dtype", "float32",  # exact enough to compare (the seed's bfloat16 would round both runs differently)
        "--lora_dropout", "0",  # dropout masks would differ between the runs
        # qkv: the vision blocks' attention, so adapters also sit in checkpointed blocks whose inputs need no gradient,
        # where a wrong checkpointing mode loses them (fix ledger M3); the text layers' inputs get requires_grad
        # from TRL (enable_input_require_grads), so the seed's q_proj/v_proj alone would not tell the modes apart
        "--lora_target_modules", "q_proj", "v_proj", "qkv",
        "--per_device_train_batch_size", str(per_device_batch),
        "--num_generations", "2",
        "--max_steps", "1",
        "--max_grad_norm", "0",  # read the raw gradient: the single-process Trainer clips before the read
        "--synthetic_rows", "16",
        "--log_completions", "false",  # the fixed batch has no rollout to print
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--report_to", "none",
    ]


def load(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["report"])


def test_zero3_checkpointed_lora_gradients_equal_single_process(tiny_model, tmp_path):
    zero3_file, plain_file = tmp_path / "zero3.safetensors", tmp_path / "plain.safetensors"
    # 4 rows in both: 2 per process under ZeRO-3, 4 in the single process.
    run(launch_cmd(HELPER, [zero3_file, *grad_check_args(tiny_model, tmp_path / "z3", 2, checkpointing=True)]))
    run([PYTHON, str(REPO / HELPER), plain_file, *grad_check_args(tiny_model, tmp_path / "plain", 4, checkpointing=False)])
    zero3, zero3_report = load(zero3_file)
    plain, plain_report = load(plain_file)

    assert zero3_report["world_size"] == 2 and zero3_report["distributed_type"] == "DistributedType.DEEPSPEED"
    assert plain_report["world_size"] == 1 and plain_report["checkpointing_kwargs"] is None
    assert sorted(zero3) == sorted(plain)
    assert any(".visual." in n for n in plain) and any(".language_model." in n for n in plain)
    assert all(n.endswith(("lora_A.default.weight", "lora_B.default.weight")) for n in plain)
    # Every adapter tensor has a gradient in the reference, so a dropped one cannot hide behind zeros on both sides.
    zero_in_reference = [n for n, g in plain.items() if not g.abs().max() > 0]
    assert not zero_in_reference, f"reference gradients all zero: {zero_in_reference}"

    diffs = {n: float((zero3[n] - plain[n]).abs().max() / plain[n].abs().max()) for n in plain}
    # one JSON line (pytest -s shows it): experiments/vlm-grpo/cpu-results/zero3-gradients*.json are such lines
    print(json.dumps({"relative_tolerance": RELATIVE_TOLERANCE, "max_relative_difference": max(diffs.values()),
                      "relative_difference": diffs}))
    off = {n: d for n, d in diffs.items() if not d <= RELATIVE_TOLERANCE}
    assert not off, (
        f"LoRA gradients under ZeRO-3 + checkpointing differ from the single-process ones by more than "
        f"{RELATIVE_TOLERANCE} of the tensor's largest gradient: {json.dumps(off, indent=1)}"
    )
    assert zero3_report["checkpointing_kwargs"] == {"use_reentrant": False, "determinism_check": "none"}, (
        "the ZeRO-3 run must use zero3.py's checkpointing fix (M1)"
    )
