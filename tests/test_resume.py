"""Resume (issue 10 item 1, issue 14 items 2 and 4): which checkpoint a run resumes, in every layout FlexAI can mount
at FLEXAI_INPUT_CHECKPOINT_DIR and in output_dir; what makes a checkpoint whole; `--resume auto|require|continue|
fresh`; saved arguments that differ; and a 2-process ZeRO-3 checkpoint resumed by 1 process (refused in one line,
then `--resume_weights_only`). The unit tests build checkpoints file by file in the layout a real run writes (see
test_faults.py for real runs); `make_checkpoint` is shared with test_args.py and test_dry_run.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import checkpoints
from checkpoints import CheckpointError, checkpoint_problem, choose_checkpoint
from grpo_vlm import ConfigError, parse_args, resolve_args


def make_checkpoint(folder: Path, step: int, processes: int | None = None, run_args: dict | None = None) -> Path:
    """A whole trainer checkpoint of `step`, in the files HF Trainer + PEFT write: DeepSpeed's layout for
    `processes` ranks (global_stepN/ shards, `latest`, rng_state_<rank>.pth), or the plain one (optimizer.pt)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (folder / "adapter_config.json").write_text("{}")
    save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(2, 2)}, folder / "adapter_model.safetensors")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    if processes is None:
        torch.save({"state": {}}, folder / "optimizer.pt")
        torch.save({"cpu": 0}, folder / "rng_state.pth")
    else:
        (folder / "latest").write_text(f"global_step{step}")
        (folder / f"global_step{step}").mkdir()
        for rank in range(processes):
            for kind in ("optim", "model"):
                shard = f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
                torch.save({"rank": rank}, folder / f"global_step{step}" / shard)
            torch.save({"cpu": rank}, folder / (f"rng_state_{rank}.pth" if processes > 1 else "rng_state.pth"))
    if run_args is not None:
        (folder / checkpoints.RUN_ARGS).write_text(json.dumps(run_args))
    return folder


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("FLEXAI_OUTPUT_CHECKPOINT_DIR", "FLEXAI_INPUT_CHECKPOINT_DIR", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_DEEPSPEED_ZERO_STAGE", checkpoints.FAULT_ENV):
        monkeypatch.delenv(var, raising=False)


# ---- layouts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relative",
    [
        ".",  # the checkpoint itself is mounted
        "checkpoint-7",  # a run's output folder
        "my-push/checkpoint-7",  # one level of named folder (FlexAI's EasyR1 blueprint reads this)
        "grpo-Qwen2.5-VL-3B-Instruct/checkpoint-7",  # the seed's /output-checkpoint/grpo-.../checkpoint-N
        "my-push/grpo-Qwen2.5-VL-3B-Instruct/checkpoint-7",  # both
        "my-push/step7",  # a named checkpoint folder (trainer_state.json inside)
    ],
)
def test_every_flexai_layout_is_found(tmp_path, relative):
    ckpt = make_checkpoint(tmp_path / "input" / relative, 7, processes=2)
    choice = choose_checkpoint(None, str(tmp_path / "input"), world_size=2, deepspeed=True)
    assert Path(choice.path).resolve() == ckpt.resolve() and choice.step == 7


def test_newest_by_step_across_input_and_output_dir(tmp_path):
    make_checkpoint(tmp_path / "input" / "checkpoint-3", 3, processes=2)
    newer = make_checkpoint(tmp_path / "out" / "checkpoint-5", 5, processes=2)
    assert choose_checkpoint(str(tmp_path / "out"), str(tmp_path / "input"), 2, True).path == str(newer)
    newest = make_checkpoint(tmp_path / "input" / "run" / "checkpoint-10", 10, processes=2)  # 10 > 5: numeric order
    assert choose_checkpoint(str(tmp_path / "out"), str(tmp_path / "input"), 2, True).path == str(newest)


def test_step_comes_from_the_trainer_state_not_the_folder_name(tmp_path):
    make_checkpoint(tmp_path / "input" / "checkpoint-9", 9, processes=2)
    renamed = make_checkpoint(tmp_path / "input" / "final", 12, processes=2)  # a user-named folder, later step
    assert choose_checkpoint(None, str(tmp_path / "input"), 2, True).path == str(renamed)


def test_partial_saves_and_moved_aside_runs_are_never_candidates(tmp_path):
    good = make_checkpoint(tmp_path / "out" / "checkpoint-2", 2, processes=2)
    make_checkpoint(tmp_path / "out" / ".partial-checkpoint-3" / "checkpoint-3", 3, processes=2)  # a crashed save
    make_checkpoint(tmp_path / "out" / "previous-1" / "checkpoint-9", 9, processes=2)  # an old run, moved aside
    make_checkpoint(tmp_path / "input" / "previous-1" / "checkpoint-9", 9, processes=2)
    assert choose_checkpoint(str(tmp_path / "out"), str(tmp_path / "input"), 2, True).path == str(good)


# ---- whole or not -----------------------------------------------------------------------------------------------


def _damage(ckpt: Path, how: str) -> None:
    if how == "truncated adapter":
        data = (ckpt / "adapter_model.safetensors").read_bytes()
        (ckpt / "adapter_model.safetensors").write_bytes(data[: len(data) - 8])
    elif how == "no trainer state":
        (ckpt / "trainer_state.json").unlink()
    elif how == "cut trainer state":
        (ckpt / "trainer_state.json").write_text('{"global_st')
    elif how == "missing optimizer shard":
        next(ckpt.glob("global_step*/zero_pp_rank_1_*_optim_states.pt")).unlink()
    elif how == "truncated optimizer shard":
        shard = next(ckpt.glob("global_step*/zero_pp_rank_0_*_optim_states.pt"))
        shard.write_bytes(shard.read_bytes()[:100])
    elif how == "no latest":
        (ckpt / "latest").unlink()
    elif how == "no scheduler":
        (ckpt / "scheduler.pt").unlink()
    elif how == "empty rng file":
        (ckpt / "rng_state_1.pth").write_bytes(b"")


@pytest.mark.parametrize(
    "how, said",
    [
        ("truncated adapter", "adapter_model.safetensors is unreadable"),
        ("no trainer state", "trainer_state.json is missing"),
        ("cut trainer state", "trainer_state.json is unreadable"),
        ("missing optimizer shard", "lacks optim shard of rank 1"),
        ("truncated optimizer shard", "zero_pp_rank_0_mp_rank_00_optim_states.pt is unreadable"),
        ("no latest", "`latest` file is missing"),
        ("no scheduler", "scheduler.pt is missing"),
        ("empty rng file", "rng_state_1.pth is unreadable"),
    ],
)
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, how, said):
    good = make_checkpoint(tmp_path / "out" / "checkpoint-1", 1, processes=2)
    bad = make_checkpoint(tmp_path / "out" / "checkpoint-2", 2, processes=2)
    before = sorted(p.relative_to(bad) for p in bad.rglob("*"))
    _damage(bad, how)
    assert said in checkpoint_problem(bad, 2, True).what
    choice = choose_checkpoint(str(tmp_path / "out"), None, 2, True)
    assert choice.path == str(good)
    assert len(choice.skipped) == 1 and choice.skipped[0].startswith(f"{bad}: ") and said in choice.skipped[0]
    assert len(sorted(bad.rglob("*"))) >= len(before) - 1, "the damaged checkpoint is left as it was"


def test_another_process_count_is_refused_in_one_line_naming_the_alternative(tmp_path):
    make_checkpoint(tmp_path / "out" / "checkpoint-4", 4, processes=2)
    with pytest.raises(CheckpointError) as err:
        choose_checkpoint(str(tmp_path / "out"), None, world_size=4, deepspeed=True)
    message = str(err.value)
    assert "\n" not in message and "saved by 2 processes" in message and "this run has 4" in message
    assert "--resume_weights_only" in message
    choice = choose_checkpoint(str(tmp_path / "out"), None, world_size=4, deepspeed=True, weights_only=True)
    assert choice.path.endswith("checkpoint-4") and choice.weights_only


# ---- --resume and saved arguments (through the script's own argument handling) ----------------------------------


def _args(out: Path, *extra: str):
    args = parse_args(["--model_name_or_path", "tiny", "--output_dir", str(out), "--report_to", "none", *extra])
    return args


def _saved_signature(out: Path, *extra: str) -> dict:
    return checkpoints.training_signature(*_args(out, *extra))


def test_require_with_nothing_to_resume_fails_listing_what_the_mount_holds(monkeypatch, tmp_path):
    (tmp_path / "input" / "pushed" / "notes").mkdir(parents=True)
    (tmp_path / "input" / "pushed" / "adapter_model.safetensors").write_bytes(b"")
    monkeypatch.setenv("FLEXAI_INPUT_CHECKPOINT_DIR", str(tmp_path / "input"))
    args = _args(tmp_path / "out", "--resume", "require")
    with pytest.raises(ConfigError) as err:
        resolve_args(*args)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--resume require: no whole trainer checkpoint")
    assert "pushed/" in message and "pushed/adapter_model.safetensors" in message and "pushed/notes/" in message
    assert f"--output_dir {tmp_path / 'out'} (does not exist)" in message


def test_auto_with_nothing_starts_at_step_0(monkeypatch, tmp_path):
    (tmp_path / "input").mkdir()
    monkeypatch.setenv("FLEXAI_INPUT_CHECKPOINT_DIR", str(tmp_path / "input"))
    args = _args(tmp_path / "out")
    resolve_args(*args)
    assert args[1].resume_from_checkpoint is None


def test_resume_logs_folder_and_step(tmp_path, caplog):
    ckpt = make_checkpoint(tmp_path / "out" / "checkpoint-6", 6, run_args=_saved_signature(tmp_path / "out"))
    args = _args(tmp_path / "out", "--resume", "require")
    with caplog.at_level("INFO", logger="grpo_vlm"):
        resolve_args(*args)
    assert args[1].resume_from_checkpoint == str(ckpt)
    assert f"resuming from {ckpt} (step 6)" in caplog.text


def test_changed_training_arguments_are_refused_with_a_one_line_diff(tmp_path):
    saved = _saved_signature(tmp_path / "out")
    make_checkpoint(tmp_path / "out" / "checkpoint-6", 6, run_args=saved)
    args = _args(tmp_path / "out", "--learning_rate", "0.001", "--lora_r", "8")
    with pytest.raises(ConfigError) as err:
        resolve_args(*args)
    message = str(err.value)
    assert "\n" not in message
    assert f"learning_rate {json.dumps(saved['learning_rate'])} -> 0.001" in message
    assert f"lora_r {saved['lora_r']} -> 8" in message
    assert "--resume continue" in message and "--resume fresh" in message


def test_arguments_that_do_not_change_training_are_not_compared(tmp_path):
    make_checkpoint(tmp_path / "out" / "checkpoint-6", 6, run_args=_saved_signature(tmp_path / "out"))
    args = _args(tmp_path / "out", "--max_steps", "500", "--save_steps", "7", "--logging_steps", "3")
    resolve_args(*args)  # longer, other logging and saving: the same run, resumed
    assert args[1].resume_from_checkpoint.endswith("checkpoint-6")


def test_continue_resumes_with_the_new_arguments(tmp_path, caplog):
    make_checkpoint(tmp_path / "out" / "checkpoint-6", 6, run_args=_saved_signature(tmp_path / "out"))
    args = _args(tmp_path / "out", "--learning_rate", "0.001", "--resume", "continue")
    with caplog.at_level("INFO", logger="grpo_vlm"):
        resolve_args(*args)
    assert args[1].resume_from_checkpoint.endswith("checkpoint-6")
    assert "changed arguments: learning_rate" in caplog.text


def test_fresh_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    out = tmp_path / "out"
    make_checkpoint(out / "checkpoint-6", 6, run_args=_saved_signature(out))
    (out / "adapter_model.safetensors").write_bytes(b"final adapter")
    (out / checkpoints.RUN_ARGS).write_text(json.dumps(_saved_signature(out)))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    args = _args(out, "--learning_rate", "0.001", "--resume", "fresh")
    resolve_args(*args)
    assert args[1].resume_from_checkpoint is None
    assert sorted(p.relative_to(out / "previous-1") for p in (out / "previous-1").rglob("*")) == before
    assert (out / "previous-1" / "adapter_model.safetensors").read_bytes() == b"final adapter"
    # a later auto run neither resumes nor refuses because of the moved run
    later = _args(out, "--learning_rate", "0.001")
    resolve_args(*later)
    assert later[1].resume_from_checkpoint is None


def test_a_fresh_run_into_a_finished_run_with_other_arguments_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"final adapter")
    (out / checkpoints.RUN_ARGS).write_text(json.dumps(_saved_signature(out)))
    with pytest.raises(ConfigError, match="holds a run with other arguments .*learning_rate"):
        resolve_args(*_args(out, "--learning_rate", "0.001"))
    assert (out / "adapter_model.safetensors").read_bytes() == b"final adapter"


def test_weights_only_needs_a_lora_adapter(tmp_path):
    make_checkpoint(tmp_path / "out" / "checkpoint-6", 6, processes=2)
    with pytest.raises(ConfigError, match="--resume_weights_only loads a checkpoint's LoRA adapter: it needs --use_pe"):
        resolve_args(*_args(tmp_path / "out", "--resume_weights_only"))


def test_resume_mode_is_checked():
    with pytest.raises(SystemExit):
        parse_args(["--model_name_or_path", "tiny", "--resume", "always"])


# ---- 2 processes saved, 1 process resumes -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_checkpoint_resumed_by_one_process_refused_then_weights_only(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from test_faults import base_run, launch, logged_steps, record

    base = base_run(tiny_model)  # 2 ZeRO-3 processes, checkpoint-1 and checkpoint-2
    out = tmp_path / "run"
    shutil.copytree(base, out)

    refused = launch(tiny_model, out, steps=3, processes=1)
    assert refused.returncode != 0
    errors = [line for line in (refused.stdout + refused.stderr).splitlines() if line.startswith("error: ")]
    assert errors and errors[0] == (
        f"error: cannot resume {out / 'checkpoint-2'} (step 2): saved by 2 processes (ZeRO-3 optimizer shards are per "
        "process), this run has 1. Resume with the same process count, or add --resume_weights_only to start from its "
        "adapter weights with a fresh optimizer (step count and LR schedule kept)"
    )
    assert "plan:" not in refused.stderr, "refused before the data and the model were loaded"

    proc = launch(tiny_model, out, steps=3, processes=1, extra=["--resume_weights_only"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resuming from {out / 'checkpoint-2'} (step 2, weights only: fresh optimizer)" in proc.stderr
    assert logged_steps(out / "checkpoint-3") == [1, 2, 3], "the step count continued"
    assert (out / "checkpoint-3" / "rng_state.pth").exists(), "saved by the 1-process run"

    # The weights came from checkpoint-2. LoRA's B starts at zero, and a fresh Adam's first step moves each weight by
    # at most the learning rate (|g| / (|g| + eps) <= 1): so from B = 0 no weight could pass lr in one step, and from
    # checkpoint-2's B no weight may move by more than lr.
    lr = 1e-3
    before, after = load_file(out / "checkpoint-2" / "adapter_model.safetensors"), load_file(
        out / "checkpoint-3" / "adapter_model.safetensors")
    lora_b = [k for k in after if "lora_B" in k]
    assert lora_b and set(after) == set(before)
    assert max(float((after[k] - before[k]).abs().max()) for k in lora_b) <= lr * 1.0001
    assert max(float(after[k].abs().max()) for k in lora_b) > 1.5 * lr, "B started from checkpoint-2, not from 0"
    assert any(not (after[k] == before[k]).all() for k in lora_b), "the resumed step trained"
    record("checkpoint of 2 processes resumed by 1", "`accelerate launch --num_processes 1` on a 2-process ZeRO-3 run",
           True, 0, "`" + errors[0].replace(str(out), "...").split(". Resume with")[0] + ". ...`; with "
           "`--resume_weights_only`: `resuming from .../checkpoint-2 (step 2, weights only: fresh optimizer)`",
           resumed_from=2,
           final_steps=[1, 2, 3], note="steps are kept; the optimizer's moments restart")


# ---- graceful stop (in this process: the end-to-end SIGTERM run is in test_faults.py) ------------------------------


def test_sigterm_asks_the_trainer_to_save_and_stop_at_the_step_end():
    import signal
    import types

    from transformers import TrainerControl, TrainerState

    stop = checkpoints.GracefulStop()
    args, state = types.SimpleNamespace(device="cpu"), TrainerState(global_step=4)
    before = signal.getsignal(signal.SIGTERM)
    stop.on_train_begin(args, state, TrainerControl())
    try:
        control = stop.on_step_end(args, state, TrainerControl())
        assert not control.should_save and not control.should_training_stop, "no signal: training goes on"
        signal.raise_signal(signal.SIGTERM)  # the handler only records it: this process is still here
        control = stop.on_step_end(args, state, TrainerControl())
        assert control.should_save and control.should_training_stop
        assert (stop.stopped_at, stop.exit_status) == (4, 143)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the step end
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.on_train_end(args, state, TrainerControl())
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handlers are back after training"



# ---- a dry run on a CPU machine over a GPU job's checkpoint ------------------------------------------------------


def test_a_cpu_dry_run_is_not_refused_for_the_gpus_bf16_alone(tmp_path):
    """A GPU job saves bf16=true (TRL's default); the same command on a machine without a GPU parses bf16=false. The
    dry run checks the user's command, so it resumes the checkpoint; a real run there would train otherwise and is
    refused (the control); any other changed argument is refused in the dry run too."""
    out = tmp_path / "out"
    gpu_signature = {**_saved_signature(out), "bf16": True}
    assert _saved_signature(out)["bf16"] is False, "this machine has no GPU: the parser turned bf16 off"
    ckpt = make_checkpoint(out / "checkpoint-6", 6, run_args=gpu_signature)

    dry = _args(out, "--dry_run")
    resolve_args(*dry)
    assert dry[1].resume_from_checkpoint == str(ckpt)

    with pytest.raises(ConfigError) as err:  # control: the same folder, a real run on this machine
        resolve_args(*_args(out))
    assert "(bf16 true -> false)" in str(err.value)

    with pytest.raises(ConfigError) as err:
        resolve_args(*_args(out, "--dry_run", "--learning_rate", "0.001"))
    assert "was trained with other arguments (learning_rate" in str(err.value) and "bf16" not in str(err.value)
