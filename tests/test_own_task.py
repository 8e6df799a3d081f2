"""Your own task through the seed's generation path (issue 19): a jsonl in the user's own column names, with one to
three images of different sizes a row, and a reward file from outside the repository, trained 3 steps by the seed
command (`--use_vllm --vllm_mode colocate`, 2-process ZeRO-3, gradient checkpointing) on the tiny model. One run
proves: the column flags reach training, the custom reward is called with the dataset's columns and logged under its
function name at every step, vLLM gets a per-prompt image limit from the data (M12), and for every prompt of one,
two or three images the ids vLLM expands to equal the trainer's (the M8 hand-off, per image)."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest
from PIL import Image

import _forkserver
from _tiny import REPO
from test_train_cpu import env, launch_cmd
from test_vllm_colocate import vllm_seed_args

# A reward that reads two of the user's columns by name (`answer`, `images`): 1.0 when the completion states the
# row's image count. Random weights rarely do, so the mean is mostly 0; what matters is that it is logged.
REWARD_FILE = '''
def states_image_count(completions, answer, images, **kwargs):
    return [float(str(len(imgs)) in c[-1]["content"]) for c, imgs in zip(completions, images)]
'''
# (width, height) of each row's images: 1, 2 or 3 images, no two rows alike
ROW_IMAGES = [[(56, 56)], [(84, 56), (56, 112)], [(56, 84), (112, 56), (84, 84)], [(112, 84)],
              [(56, 56), (84, 84)], [(140, 56), (56, 56), (56, 140)], [(84, 112)], [(112, 112), (56, 84)]]


def write_own_jsonl(folder):
    (folder / "pictures").mkdir(parents=True)
    lines = []
    for i, sizes in enumerate(ROW_IMAGES):
        paths = []
        for j, size in enumerate(sizes):
            Image.new("RGB", size, (30 * i, 60 * j, 200)).save(folder / "pictures" / f"{i}-{j}.png")
            paths.append(f"pictures/{i}-{j}.png")
        lines.append(json.dumps({"question": f"How many pictures are there ({i})?", "images": paths,
                                 "answer": f"<think>I count them.</think><answer>{len(sizes)}</answer>"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def run_group(cmd, timeout=900) -> subprocess.CompletedProcess:
    """cmd (a launch_cmd) with a time bound, the launcher a fork of the launcher's server (tests/_forkserver.py); on
    timeout the launcher, its workers and their vLLM engines are killed."""
    return _forkserver.launch(cmd, cwd=REPO, env=env(), timeout=timeout)


@pytest.fixture(scope="module")
def own_task_run(tiny_model, tmp_path_factory):
    from _vllm import require_vllm

    require_vllm()
    tmp = tmp_path_factory.mktemp("own-task")
    data = write_own_jsonl(tmp / "data")
    reward = tmp / "elsewhere" / "my_reward.py"  # outside the repository, as a FlexAI dataset mount would be
    reward.parent.mkdir()
    reward.write_text(REWARD_FILE)
    out = tmp / "run"
    args = [*vllm_seed_args(tiny_model, out, 3), "--dataset_name", str(data), "--eval_fraction", "0",
            "--image_column", "images", "--problem_column", "question", "--solution_column", "answer",
            "--reward_funcs", "format", f"{reward}:states_image_count", "--reward_weights", "1.0", "0.5",
            "--max_completion_length", "24", "--per_device_train_batch_size", "4", "--num_generations", "4",
            "--logging_steps", "1", "--save_steps", "3"]
    proc = run_group(launch_cmd("tests/own_task_check.py", [tmp / "handoffs.json", *args]))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    handoffs = [h for rank in (0, 1) for h in json.loads((tmp / f"handoffs.json.rank{rank}").read_text())]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    return {"proc": proc, "handoffs": handoffs, "log_history": state["log_history"], "out": out}


@pytest.mark.slow
def test_own_columns_and_reward_file_train_three_steps_through_vllm(own_task_run):
    steps = [h for h in own_task_run["log_history"] if "rewards/states_image_count/mean" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]  # the custom reward, under its function name, at every step
    assert all("rewards/format_reward/mean" in h for h in steps)
    assert json.loads((own_task_run["out"] / "split.json").read_text())["columns"] == {
        "image": "images", "problem": "question", "solution": "answer"}


@pytest.mark.slow
def test_vllm_gets_the_datas_image_limit_and_every_multi_image_prompt_matches(own_task_run):
    output = own_task_run["proc"].stdout + own_task_run["proc"].stderr
    assert "vLLM: at most 3 image(s) per prompt" in output  # M12: the largest row of the data
    handoffs = own_task_run["handoffs"]
    # 3 steps x 2 ranks x 4 completions, each one prompt handed to vLLM
    assert len(handoffs) == 24, handoffs
    assert all(h["engine_equals_trainer"] for h in handoffs), handoffs
    counts = Counter(h["images"] for h in handoffs)
    assert counts[2] and counts[3], counts  # prompts of two and three images went through vLLM


@pytest.mark.slow
def test_grounding_trains_three_steps_through_vllm_with_format_and_iou(tiny_model, tmp_path):
    """The grounding task, scored by `format` and `iou`, on the seed's generation path. The tiny model's random
    completions hold no box, so iou is 0 here: this proves the plumbing (the grounding rows, the frame columns the
    iou reward reads reaching it through TRL), not learning."""
    out = tmp_path / "run"
    args = [*vllm_seed_args(tiny_model, out, 3), "--dataset_name", "grounding", "--synthetic_rows", "16",
            "--eval_fraction", "0", "--reward_funcs", "format", "iou", "--max_completion_length", "16",
            "--per_device_train_batch_size", "4", "--num_generations", "4", "--logging_steps", "1", "--save_steps", "3"]
    proc = run_group(launch_cmd("code/vlm-grpo/grpo_vlm.py", args))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "rewards/iou_reward/mean" in h] == [1, 2, 3]


# ---- experiments/vlm-grpo/own-task.md: every snippet runs ------------------------------------------------------

GUIDE = REPO / "experiments" / "vlm-grpo" / "own-task.md"


def blocks(lang: str) -> list[str]:
    import re

    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), re.DOTALL)


@pytest.fixture
def photos(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (84, 56), (200, 30, 30)).save(tmp_path / "photos" / "before.png")
    Image.new("RGB", (56, 112), (30, 30, 200)).save(tmp_path / "photos" / "after.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_guides_rows_load_in_every_format_with_its_column_flags(photos, processor):
    import shutil

    from data import Columns, load_raw_dataset, prepare_dataset

    (jsonl,) = blocks("json")
    (photos / "jsonl").mkdir()
    shutil.copytree(photos / "photos", photos / "jsonl" / "photos")
    (photos / "jsonl" / "train.jsonl").write_text(jsonl)
    parquet, hub = blocks("python")[:2]
    exec(parquet, {})
    exec(hub, {})
    columns = Columns(image="images", problem="question", solution="answer")  # the flags the guide passes
    for source in ("jsonl/train.jsonl", "train.parquet", "my-cracks"):
        prepared, stats = prepare_dataset(load_raw_dataset(source, columns=columns), processor)
        assert stats.kept == 1 and [im.size for im in prepared[0]["images"]] == [(84, 56), (56, 112)], source
        assert prepared[0]["problem"] == "Which photo shows the larger crack?"


def test_the_guides_reward_file_loads_and_scores(photos):
    from rewards import check_reward_funcs, get_reward_funcs

    (photos / "photos_reward.py").write_text(blocks("python")[2])
    spec = "photos_reward.py:names_the_photo"  # relative to the working directory, as in the guide's command
    funcs = get_reward_funcs(["format", spec])
    gold = "<think>The right one is wider.</think><answer>after</answer>"
    check_reward_funcs(["format", spec], funcs, {"problem": "q", "solution": gold, "answer": gold})
    said = [[{"role": "assistant", "content": f"<think>x</think><answer>{a}</answer>"}] for a in ("After", "before")]
    assert funcs[1](said, answer=[gold, gold]) == [1.0, 0.0]


def test_the_guides_commands_parse_and_the_push_checks_the_columns(photos, tiny_model):
    import shlex

    import grpo_vlm
    from flexai_stub import block_commands, offline_seed_script_args, run_make, shell_blocks

    commands = [c for block in shell_blocks(GUIDE.read_text()) for c in block_commands(block)]
    assert [c[1] for c in commands] == ["flexai-dataset-push", "flexai-train", "flexai-train"]
    (photos / "photos_reward.py").write_text(blocks("python")[2])
    for command in commands:
        args = shlex.split(dict(a.split("=", 1) for a in command[2:])["ARGS"])
        script_args, training_args, _ = grpo_vlm.parse_args([*offline_seed_script_args(tiny_model, photos / "o"), *args])
        grpo_vlm.get_reward_funcs(script_args.reward_funcs)  # every reward named resolves
    assert script_args.dataset_name == "grounding" and script_args.reward_funcs == ["format", "iou"]
    # the push command on a folder holding the guide's jsonl row: checked with the columns of ARGS, then pushed
    folder = photos / "my-cracks-jsonl"
    folder.mkdir()
    (folder / "train.jsonl").write_text(blocks("json")[0].replace("photos/", str(photos / "photos") + "/"))
    push = [a.replace("DIR=my-cracks-jsonl", f"DIR={folder}") for a in commands[0][1:]]
    run = run_make(photos / "make", *push)
    assert run.returncode == 0, run.stderr
    assert run.argv("flexai") == [["dataset", "push", "my-cracks", "--file", str(folder)]]


def test_training_checks_the_reward_before_any_weights_load(tiny_model, tmp_path, monkeypatch):
    """build_trainer calls each reward on the first row before the trainer (which loads the weights) is built."""
    import grpo_vlm
    import trainer
    from flexai_stub import offline_seed_script_args
    from rewards import RewardError

    reward = tmp_path / "my_reward.py"
    reward.write_text("def needs_box(completions, box, **kwargs):\n    return [0.0] * len(completions)\n")
    argv = [*offline_seed_script_args(tiny_model, tmp_path / "out"), "--reward_funcs", f"{reward}:needs_box"]
    script_args, training_args, model_args = grpo_vlm.parse_args(argv)
    built = []
    monkeypatch.setattr(trainer, "VLMGRPOTrainer", lambda *a, **k: built.append(1))
    row = {"prompt": [], "problem": "q", "solution": "<answer>1</answer>", "image": None}
    with pytest.raises(RewardError, match=r"needs_box: calling it on a dummy completion raised TypeError"):
        grpo_vlm.build_trainer(script_args, training_args, model_args, None, [row], None)
    assert built == []
    fixed = tmp_path / "fixed_reward.py"  # the control: the same reward, taking the columns the data has
    fixed.write_text("def needs_box(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    script_args.reward_funcs = [f"{fixed}:needs_box"]
    grpo_vlm.build_trainer(script_args, training_args, model_args, None, [row], None)
    assert built == [1]
