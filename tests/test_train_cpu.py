"""Training on CPU through the real script: single process, 2-process ZeRO-3 with gradient checkpointing, and a
run killed after its first checkpoint then resumed. All on the tiny offline model and the synthetic dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)

from flexai_stub import offline_seed_script_args

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "code" / "vlm-grpo" / "deepspeed_zero3.yaml"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable

pytestmark = pytest.mark.slow


def seed_script_args(model: Path, output_dir: Path, steps: int) -> list[str]:
    """The offline seed arguments (model, dataset, output dir swapped, no vLLM) with the step count swapped too."""
    return [*offline_seed_script_args(model, output_dir), "--max_steps", str(steps)]


def env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def launch_cmd(entry: str, args: list[str], num_processes: int = 2) -> list[str]:
    launch = [PYTHON, "-m", "accelerate.commands.launch", f"--config_file={CONFIG}"]
    if num_processes != 2:
        launch += ["--num_processes", str(num_processes)]
    return [*launch, entry, *map(str, args)]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = _proc.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


# Small, fast variations on top of the seed's flags: short completions, 4 completions per process, and a reward with
# variance for a random-weights model (the seed's format/accuracy rewards are all-zero for it, so no gradient).
FAST = [
    "--max_completion_length", "24",
    "--per_device_train_batch_size", "4",
    "--num_generations", "4",
    "--learning_rate", "1e-3",
    "--reward_funcs", "digit_ratio", "format", "accuracy",
    "--logging_steps", "1",
    "--report_to", "none",
]


def test_single_process_grpo(tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = run([PYTHON, str(REPO / "code/vlm-grpo/grpo_vlm.py"), *seed_script_args(tiny_model, out, 2), *FAST])
    adapter = out / "adapter_model.safetensors"
    assert f"saved: {adapter}" in proc.stdout
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (out / "preprocessor_config.json").exists(), "the processor is saved next to the adapter"


def test_seed_command_trains_under_zero3_with_checkpointing(tiny_model, tmp_path):
    """The seed's arguments as written (model, dataset, output dir, steps swapped), 2 ZeRO-3 CPU processes."""
    out = tmp_path / "run"
    proc = run(launch_cmd("code/vlm-grpo/grpo_vlm.py", seed_script_args(tiny_model, out, 2)))
    assert f"saved: {out / 'adapter_model.safetensors'}" in proc.stdout
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


def test_zero3_updates_every_lora_weight_and_no_base_weight(tiny_model, tmp_path):
    out, report_path = tmp_path / "run", tmp_path / "report.json"
    run(launch_cmd("tests/zero3_weight_check.py", [report_path, *seed_script_args(tiny_model, out, 3), *FAST]))
    report = json.loads(report_path.read_text())

    assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["world_size"] == 2
    # LoRA on q_proj and v_proj of every language-model layer, nothing else trainable.
    trainable = report["trainable"]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    unchanged = [n for n, changed in report["lora_changed"].items() if not changed]
    assert not unchanged, f"LoRA weights that training did not move (silent no-op, KNOWN_ISSUES M3): {unchanged}"
    assert all(report["lora_nonzero_B"].values())
    changed = [n for n, c in report["base_changed"].items() if c]
    missing = [n for n, c in report["base_changed"].items() if c is None]
    assert not changed, f"frozen base weights changed: {changed}"
    assert not missing, f"parameters with no counterpart in the model file: {missing}"
    # M4: one LR per optimizer group (torch 2.8 would silently ignore a mismatch, torch >= 2.10 crashes).
    assert report["scheduler_base_lrs"] == report["optimizer_groups"]
    # M1': the checkpointing mode configured for ZeRO-3 is still in force after rollouts.
    assert report["checkpointing_kwargs_at_end"] == {"use_reentrant": False, "determinism_check": "none"}
    losses = [h["loss"] for h in report["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(loss == loss for loss in losses), "a loss per step, none NaN"

    from safetensors import safe_open

    with safe_open(report["adapter"], framework="pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    assert len(shapes) == len(trainable) and all(s and 0 not in s for s in shapes), "adapter file holds every LoRA tensor"
    assert Path(report["adapter"]).stat().st_size > 10_000


def test_zero3_tuning_flags_reach_deepspeed(tiny_model, tmp_path):
    """--zero3_param_persistence_threshold / --zero3_prefetch_bucket_size (the tuned benchmark configuration) end up in
    the engine's config, instead of accelerate's hidden-size "auto" values, and training stays correct with them."""
    out, report_path = tmp_path / "run", tmp_path / "report.json"
    knobs = ["--zero3_param_persistence_threshold", "20000", "--zero3_prefetch_bucket_size", "100000"]
    run(launch_cmd("tests/zero3_weight_check.py", [report_path, *seed_script_args(tiny_model, out, 2), *FAST, *knobs]))
    report = json.loads(report_path.read_text())

    zero = report["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 20000 and zero["stage3_prefetch_bucket_size"] == 100000
    # Tiny model: q_proj is 128x128 = 16,384 elements (under the threshold: whole on every rank), gate_proj 128x256
    # = 32,768 (over it: still sharded). accelerate's default would have been 10 x 128 = 1,280.
    persistent = report["persistent_params"]
    assert any("q_proj.base_layer.weight" in n for n in persistent), persistent
    assert not any(n.endswith("gate_proj.weight") for n in persistent)
    assert all(report["lora_changed"].values()) and report["lora_changed"]
    assert not [n for n, c in report["base_changed"].items() if c]


def test_kill_after_first_checkpoint_then_resume(tiny_model, tmp_path):
    out = tmp_path / "run"
    args = [*seed_script_args(tiny_model, out, 4), *FAST, "--save_steps", "1"]
    cmd = launch_cmd("code/vlm-grpo/grpo_vlm.py", args)
    # The log goes to a file, not a pipe: nobody reads a pipe while we poll, and a full pipe (64 KiB) blocks the run.
    log = tmp_path / "first.log"
    with log.open("w") as sink, _proc.started(cmd, cwd=REPO, env=env(), stdout=sink, stderr=subprocess.STDOUT) as first:
        deadline = time.time() + 300
        # checkpoint-1 only appears once whole (written as .partial-checkpoint-1/, renamed after every process wrote
        # its files: checkpoints.CrashConsistentSaveMixin); test_faults.py kills runs in the middle of saves.
        while not (out / "checkpoint-1" / "trainer_state.json").exists():
            assert first.poll() is None, f"run ended before its first checkpoint:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline, f"no checkpoint within 300 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
    # leaving the block killed launcher and workers at once, like a preempted node
    assert not (out / "adapter_model.safetensors").exists(), "the first run was killed before it finished"
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists())

    second = run(cmd)
    assert f"resuming from {out / f'checkpoint-{done[-1]}'}" in second.stderr + second.stdout
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    logged_steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged_steps == [1, 2, 3, 4], "one log entry per step: the resumed run continued the count"
    assert (out / "adapter_model.safetensors").exists()
