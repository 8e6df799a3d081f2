"""Resume safety on real runs (issue 18 item 1): 2-process ZeRO-3 under `accelerate launch`, the tiny model, the
offline seed flags. test_resume.py proves the rules on checkpoints built file by file; here the checkpoints are the
ones a real run wrote (test_faults.base_run: 2 steps, checkpoint-1 and checkpoint-2, shared with test_faults.py).

Each real launch proves several things, so the module costs three short launches:
- a changed training argument is refused in one line, before the data and the weights load;
- `--resume continue` with that argument resumes the output dir's checkpoint while the input mount holds a whole,
  higher-step checkpoint inside a hidden staging folder (what a user mounts when they push a fetched run folder);
- `--resume fresh` moves the old run aside, byte for byte, and starts at step 0.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import checkpoints
from test_faults import base_run, launch, logged_steps

pytestmark = pytest.mark.slow


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def base(tiny_model) -> Path:
    return base_run(tiny_model)


def test_a_real_checkpoint_records_the_runs_training_arguments(base, tiny_model):
    saved = json.loads((base / "checkpoint-2" / checkpoints.RUN_ARGS).read_text())
    # the flags of test_faults.script_args (offline seed + test_train_cpu.FAST), as the run received them
    expected = {
        "model_name_or_path": str(tiny_model), "dataset_name": "synthetic", "learning_rate": 0.001,
        "max_completion_length": 24, "max_prompt_length": 2048, "per_device_train_batch_size": 4,
        "num_generations": 4, "reward_funcs": ["digit_ratio", "format", "accuracy"], "dtype": "bfloat16",
        "use_peft": True, "lora_target_modules": ["q_proj", "v_proj"], "bf16": False,
    }
    assert {k: saved.get(k) for k in expected} == expected
    assert json.loads((base / "checkpoint-1" / checkpoints.RUN_ARGS).read_text()) == saved
    assert json.loads((base / checkpoints.RUN_ARGS).read_text()) == saved, "output_dir's copy is the same"
    assert set(saved) == {name for names in checkpoints.TRAINING_FIELDS.values() for name in names}


@pytest.fixture(scope="module")
def changed_runs(base, tiny_model, tmp_path_factory):
    """A copy of the base run re-launched with another learning rate: refused, then `--resume continue`d with an input
    mount whose hidden staging folder holds a whole checkpoint of a later step (5)."""
    root = tmp_path_factory.mktemp("resume-e2e")
    out = root / "run"
    shutil.copytree(base, out)
    before = tree_digest(out)
    refused = launch(tiny_model, out, steps=3, extra=["--learning_rate", "2e-3"])
    after_refusal = tree_digest(out)

    mount = root / "input"
    staged = mount / "fetched-run" / ".partial-checkpoint-5" / "checkpoint-5"
    shutil.copytree(base / "checkpoint-2", staged)  # whole: every file of a real checkpoint
    state = json.loads((staged / "trainer_state.json").read_text())
    (staged / "trainer_state.json").write_text(json.dumps({**state, "global_step": 5}))
    assert checkpoints.checkpoint_problem(staged, 2, True) is None, "the hidden copy is a whole checkpoint"
    continued = launch(tiny_model, out, steps=3, extra=["--learning_rate", "2e-3", "--resume", "continue"],
                       extra_env={"FLEXAI_INPUT_CHECKPOINT_DIR": str(mount)})
    return {"out": out, "refused": refused, "before": before, "after_refusal": after_refusal,
            "continued": continued, "mount": mount}


def test_a_changed_training_argument_is_refused_in_one_line_before_loading(changed_runs):
    out, refused = changed_runs["out"], changed_runs["refused"]
    assert refused.returncode != 0
    assert error_lines(refused)[:1] == [
        f"error: {out / 'checkpoint-2'} (step 2) was trained with other arguments (learning_rate 0.001 -> 0.002): "
        "pass --resume continue to resume it with the new ones, --resume fresh to start at step 0 (the earlier run "
        f"is moved to {out}/previous-K, nothing is deleted), or another --output_dir"
    ]
    assert "plan:" not in refused.stderr, "refused before the data and the model were loaded"
    assert changed_runs["after_refusal"] == changed_runs["before"], "the refused run changed nothing of the old one"


def test_continue_resumes_the_real_checkpoint_with_the_new_argument(changed_runs):
    out, proc = changed_runs["out"], changed_runs["continued"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (f"resuming from {out / 'checkpoint-2'} (step 2); changed arguments: learning_rate 0.001 -> 0.002"
            in proc.stderr)
    assert logged_steps(out / "checkpoint-3") == [1, 2, 3]
    assert json.loads((out / "checkpoint-3" / checkpoints.RUN_ARGS).read_text())["learning_rate"] == 0.002


def test_a_hidden_staging_folder_in_the_input_mount_is_never_resumed(changed_runs, monkeypatch):
    """The run above resumed step 2 although the mount held a whole step-5 checkpoint under `.partial-checkpoint-5/`.
    Control: with the hidden-folder filter removed, the same search picks that step-5 copy, so the check can fail."""
    out, mount = changed_runs["out"], changed_runs["mount"]
    assert "checkpoint-5" not in changed_runs["continued"].stderr
    staged = mount / "fetched-run" / ".partial-checkpoint-5" / "checkpoint-5"
    monkeypatch.setattr(checkpoints, "_visible_dirs",
                        lambda folder: sorted(p for p in folder.iterdir() if p.is_dir()))  # the filter removed
    choice = checkpoints.choose_checkpoint(str(out), str(mount), world_size=2, deepspeed=True)
    assert Path(choice.path) == staged and choice.step == 5


def test_fresh_moves_the_real_run_aside_intact_and_starts_at_step_0(base, tiny_model, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base, out)
    before = tree_digest(out)
    proc = launch(tiny_model, out, steps=1, extra=["--resume", "fresh"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"--resume fresh: starting at step 0; the earlier run in {out} moved to {out / 'previous-1'}" in proc.stderr
    assert tree_digest(out / "previous-1") == before, "every file of the old run, unchanged"
    assert logged_steps(out / "checkpoint-1") == [1]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
