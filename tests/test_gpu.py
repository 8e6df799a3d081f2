"""GPU test: the real script, 2 ZeRO-3 processes with gradient checkpointing, on Qwen2.5-VL-3B's architecture.

Runs where CUDA shows at least 2 GPUs, skipped elsewhere:

    python3 -m pytest -m gpu tests/test_gpu.py

Set VLM_GRPO_3B_MODEL to a folder built by `scripts/make_tiny_model.py DIR --preset 3b` to reuse it; otherwise the
test builds one (random weights, offline, seconds on a GPU). Generation uses vLLM colocate where vLLM is importable
(the FlexAI runtime), transformers otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "code" / "vlm-grpo" / "deepspeed_zero3.yaml"
SCRIPT = REPO / "code" / "vlm-grpo" / "grpo_vlm.py"


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 CUDA GPUs (2-process ZeRO-3, one process per GPU)"),
]

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def model_3b(tmp_path_factory) -> Path:
    prebuilt = os.environ.get("VLM_GRPO_3B_MODEL")
    if prebuilt and (Path(prebuilt) / "config.json").exists():
        return Path(prebuilt)
    from make_tiny_model import build

    return build(tmp_path_factory.mktemp("qwen2.5-vl-3b-random") / "model", preset="3b", device="cuda")


def script_args(model: Path, out: Path, steps: int, save_steps: int) -> list[str]:
    """The seed's flags (minus the output and model), on the synthetic dataset, with three changes for a fast and
    checkable run: short completions; `digit_ratio`, a reward with variance for random weights (the seed's format and
    accuracy rewards are all zero for it: zero advantages, zero gradient); and lr 1e-3, because at the seed's 1e-5 an
    Adam step changes a LoRA A weight (~0.02) by less than bf16 resolves, so the saved adapter would look untouched."""
    args = [
        "--model_name_or_path", model, "--dataset_name", "synthetic", "--output_dir", out,
        "--max_steps", steps, "--save_steps", save_steps,
        # constant LR: the resumed run raises max_steps, and under the default linear decay its first step would
        # use the LR the first run ended with, 0 (restored from the checkpoint), and move nothing
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--gradient_checkpointing", "--dtype", "bfloat16",
        "--max_prompt_length", "2048", "--max_completion_length", "64",
        "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
        "--reward_funcs", "digit_ratio", "format", "accuracy",
        "--log_completions", "--logging_steps", "1", "--report_to", "none",
    ]
    if HAS_VLLM:
        args += ["--use_vllm", "--vllm_mode", "colocate", "--vllm_gpu_memory_utilization", "0.3"]
    return [str(a) for a in args]


def launch(args: list[str], log: Path) -> str:
    env = dict(os.environ)
    # NVLink multicast stays off (on shared multi-GPU hosts it can take GPUs down); harmless elsewhere.
    for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        env.setdefault(key, "0" if key == "NCCL_NVLS_ENABLE" else "1")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", f"--config_file={CONFIG}", str(SCRIPT), *args]
    proc = _proc.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    log.write_text(proc.stdout)
    assert proc.returncode == 0, f"exit {proc.returncode}; last lines:\n{proc.stdout[-6000:]}"
    return proc.stdout


def lora_tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(adapter)).items() if ".lora_" in k}


def test_zero3_checkpointing_trains_saves_and_resumes_on_gpus(model_3b, tmp_path):
    out = tmp_path / "run"
    first = launch(script_args(model_3b, out, steps=2, save_steps=2), tmp_path / "first.log")

    ckpt = out / "checkpoint-2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 2
    assert "'step_time'" in first, "TRL logs a step time per step"
    after_two = lora_tensors(ckpt / "adapter_model.safetensors")
    # q_proj and v_proj of each of the 36 language-model layers; the vision tower names its projections qkv/proj.
    assert len(after_two) == 36 * 2 * 2, sorted(after_two)[:4]
    # PEFT starts every lora_B at zero, and Adam moves only weights with a gradient: a zero B is an adapter that
    # training never reached (fix ledger M3's silent no-op).
    zero_b = [k for k, v in after_two.items() if ".lora_B." in k and not v.abs().sum() > 0]
    assert not zero_b, f"LoRA B weights still zero after 2 steps: {zero_b[:5]}"

    second = launch(script_args(model_3b, out, steps=3, save_steps=1), tmp_path / "second.log")
    assert f"resuming from {ckpt}" in second
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3], "the count continued at 3"
    assert not (out / "checkpoint-1").exists(), "the resumed run did not start over"
    after_three = lora_tensors(out / "adapter_model.safetensors")
    unchanged = [k for k in after_two if torch_equal(after_two[k], after_three[k])]
    assert not unchanged, f"LoRA weights the resumed step did not move: {unchanged[:5]}"


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
