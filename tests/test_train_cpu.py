"""Training on CPU through the real script: a single process, and 2-process ZeRO-3 with gradient checkpointing (the
weights it moves and the ZeRO-3 knobs that reach DeepSpeed). All on the tiny offline model and the synthetic dataset.
The helpers here (FAST, launch_cmd, run, env) are shared by the other multi-process tests."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import _forkserver
import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)

from flexai_stub import offline_seed_script_args

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "code" / "vlm-grpo" / "deepspeed_zero3.yaml"
PYTHON = _proc.PYTHON

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


def free_port() -> int:
    """A port nothing listens on now: each launch its own rendezvous port, so a run started while another is still
    up (a helper's, or a test left running) does not meet accelerate's default 29500 taken."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_cmd(entry: str, args: list[str], num_processes: int = 2) -> list[str]:
    launch = [PYTHON, "-m", "accelerate.commands.launch", f"--config_file={CONFIG}", f"--main_process_port={free_port()}"]
    if num_processes != 2:
        launch += ["--num_processes", str(num_processes)]
    return [*launch, entry, *map(str, args)]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """cmd to its end, which must be 0. A launch_cmd's launcher is a fork of the launcher's server
    (tests/_forkserver.py); its workers, and any other command, are real processes."""
    if _forkserver.is_launch(cmd):
        proc = _forkserver.launch(cmd, cwd=REPO, env=env(), timeout=timeout)
    else:
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


def test_single_process_grpo(single_process_run):
    out, proc = single_process_run
    adapter = out / "adapter_model.safetensors"
    assert f"saved: {adapter}" in proc.stdout
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (out / "preprocessor_config.json").exists(), "the processor is saved next to the adapter"


# 2-process ZeRO-3 runs of the seed flags: test_faults.base_run (transformers generation, shared by the fault and
# resume tests), test_graceful_stop.py and `make smoke` in test_walkthrough.py (vLLM colocate, the seed's own path).
# A run killed whole after a checkpoint and resumed: test_faults.py (kill -9 at each point of a save, SIGTERM).


KNOBS = ["--zero3_param_persistence_threshold", "20000", "--zero3_prefetch_bucket_size", "100000"]


@pytest.fixture(scope="module")
def weight_report(tiny_model, tmp_path_factory) -> dict:
    """tests/zero3_weight_check.py, 3 steps of the offline seed flags + FAST under 2-process ZeRO-3, with the tuned
    benchmark's ZeRO-3 knobs: one run for the two tests below (the seed's own ZeRO-3 settings are checked the same way
    through vLLM in test_vllm_colocate.py)."""
    tmp = tmp_path_factory.mktemp("zero3-weights")
    out, report_path = tmp / "run", tmp / "report.json"
    run(launch_cmd("tests/zero3_weight_check.py", [report_path, *seed_script_args(tiny_model, out, 3), *FAST, *KNOBS]))
    return json.loads(report_path.read_text())


def test_zero3_updates_every_lora_weight_and_no_base_weight(weight_report):
    report = weight_report
    assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["world_size"] == 2
    # LoRA on q_proj and v_proj of every language-model layer, nothing else trainable.
    trainable = report["trainable"]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    # an empty recorder would pass every check below: 2 layers x q/v x A/B, and the base weights it compared
    assert len(trainable) == 8 and sorted(report["lora_changed"]) == sorted(trainable)
    assert len(report["lora_nonzero_B"]) == 4 and report["base_changed"], "the recorder compared nothing"
    unchanged = [n for n, changed in report["lora_changed"].items() if not changed]
    assert not unchanged, f"LoRA weights that training did not move (silent no-op, fix ledger M3): {unchanged}"
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


def test_zero3_tuning_flags_reach_deepspeed(weight_report):
    """--zero3_param_persistence_threshold / --zero3_prefetch_bucket_size (the tuned benchmark configuration) end up in
    the engine's config, instead of accelerate's hidden-size "auto" values, and training stays correct with them."""
    report = weight_report
    zero = report["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 20000 and zero["stage3_prefetch_bucket_size"] == 100000
    # Tiny model: q_proj is 128x128 = 16,384 elements (under the threshold: whole on every rank), gate_proj 128x256
    # = 32,768 (over it: still sharded). accelerate's default would have been 10 x 128 = 1,280.
    persistent = report["persistent_params"]
    assert any("q_proj.base_layer.weight" in n for n in persistent), persistent
    assert not any(n.endswith("gate_proj.weight") for n in persistent)
    assert all(report["lora_changed"].values()) and report["lora_changed"]
    assert not [n for n, c in report["base_changed"].items() if c]
