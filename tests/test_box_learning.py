"""GRPO learns a box through the seed's generation path (issue 19, item 5c): the `iou` reward rises on the tiny model.

The task is the simplest box task: a jsonl of the user's own form where every image holds ONE shape, always at the
same box, asked "Where is the <colour> <shape>? ..." with that box as gold. The gold box is a constant, a prior the
model can learn without looking (a tiny random model does not look). The model is the untied tiny model taught only
the answer form `<think>I look.</think><answer>[x1, y1, x2, y2]</answer>` around random boxes
(make_tiny_model.teach_box_answers, through learning_demo.grounding_model): its boxes vary, so iou has variance to
learn from, and nothing about where the box is was taught. GRPO then runs the seed's command
(`--use_vllm --vllm_mode colocate`, 2-process ZeRO-3, gradient checkpointing) with `--reward_funcs format iou` and
LoRA on q/v/lm_head as learning_demo's vLLM path does (lm_head needs the untied model: vllm_colocate.py).

Measured run and its settings: experiments/vlm-grpo/cpu-results/box-learning.json (`pytest -s` prints the JSON line
this test checks). If the weight sync into vLLM were broken, or learning off, the rollouts' iou would stay at its
start (the file's `--learning_rate 0` control)."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw

import _proc
from _tiny import REPO
from test_train_cpu import env, launch_cmd
from test_vllm_colocate import vllm_seed_args

pytestmark = pytest.mark.slow

# 112 px: synthetic_data's side, the one the warm-up's prompts had, and a multiple of 28, so the frame Qwen2.5-VL
# states boxes in (the processor's resize) is the stored one and the iou reward's rescaling is the identity.
SIDE = 112
# Near the top-left corner: the warm-up's random boxes (make_tiny_model.random_box: x2, y2 drawn up to the far edge)
# rarely overlap it much (mean iou 0.02 over 20,000 of them), so the start is low; small numbers, so reachable.
BOX = (8, 8, 40, 40)
STEPS = 30

# The flags besides the seed's (vllm_seed_args): the own-task jsonl, both rewards, and learning_demo's GROUNDING_FLAGS
# except the lr: 5e-3 (iou 0.02 -> 0.55, 0.03 -> 0.45 and 0.03 -> 0.24 in three runs) where 3e-3 rose more slowly
# (0.02 -> 0.11, too close to the noise for a margin). On the varying-box `grounding` task 1e-2 broke the answer form
# (cpu-results/grounding-learning-attempts.json); here format stayed between 0.69 and 0.97 in the recorded run.
FLAGS = ["--eval_fraction", "0", "--reward_funcs", "format", "iou",
         "--lr_scheduler_type", "constant", "--learning_rate", "5e-3",
         "--use_peft", "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj", "lm_head",
         "--per_device_train_batch_size", "16", "--num_generations", "8",  # two questions a process, 8 boxes each
         "--max_completion_length", "40",  # the taught answer is about 30 tokens
         "--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", str(STEPS), "--report_to", "none",
         "--seed", "42"]


def write_box_jsonl(folder):
    """12 rows (4 colours x 3 shapes), each a white 112 x 112 image with its one shape filling BOX."""
    from synthetic_data import COLORS, GROUNDING_PROBLEM, SHAPES, _draw_shape

    (folder / "pictures").mkdir(parents=True)
    gold = "[{}, {}, {}, {}]".format(*BOX)  # the `<answer>` box the iou reward parses (rewards.extract_gold)
    lines = []
    for i, (color, shape) in enumerate((c, s) for c in sorted(COLORS) for s in SHAPES):
        image = Image.new("RGB", (SIDE, SIDE), (255, 255, 255))
        x1, y1, x2, y2 = BOX
        _draw_shape(ImageDraw.Draw(image), shape, (x1, y1, x2 - 1, y2 - 1), COLORS[color])  # x2, y2 exclusive
        image.save(folder / "pictures" / f"{i}.png")
        lines.append(json.dumps({"image": f"pictures/{i}.png",
                                 "problem": GROUNDING_PROBLEM.format(color=color, shape=shape),
                                 "solution": f"<think>The {color} {shape} is there.</think><answer>{gold}</answer>"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def box_run_args(model, data, out, extra=()) -> list[str]:
    return [*vllm_seed_args(model, out, STEPS), "--dataset_name", str(data), *FLAGS, *extra]


def iou_rises(iou: list[float]) -> tuple[bool, float, float]:
    """The check: the best mean iou over 5 consecutive steps at least 0.08, and at least 0.05 above the first 5 steps'.
    The peak, not the last steps: at lr 5e-3 the tiny policy can collapse late (the CI run in box-learning.json rose to
    0.14 by step 25, then answered boxes of iou 0 from step 28; a second run fell from 0.62 to 0.10 at step 30).
    Measured best windows (box-learning.json): 0.55, 0.54, 0.24 and 0.11 in four runs at these settings; with
    `--learning_rate 0`, 0.018 (per-step noise about 0.01), so 0.08 is four times the flat run's best."""
    first = sum(iou[:5]) / 5
    best = max(sum(iou[i:i + 5]) / 5 for i in range(len(iou) - 4))
    return best >= 0.08 and best >= first + 0.05, first, best


@pytest.fixture(scope="module")
def box_run(tmp_path_factory):
    from _vllm import require_vllm

    import learning_demo

    require_vllm()
    tmp = tmp_path_factory.mktemp("box-learning")
    model = learning_demo.grounding_model(tmp)  # the untied tiny model, taught the answer form (150 steps)
    data = write_box_jsonl(tmp / "data")
    out = tmp / "run"
    proc = _proc.run(launch_cmd("code/vlm-grpo/grpo_vlm.py", box_run_args(model, data, out)), cwd=REPO,
                     env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "rewards/iou_reward/mean" in h]
    result = {"steps": [h["step"] for h in steps],
              "iou_per_step": [round(h["rewards/iou_reward/mean"], 4) for h in steps],
              "format_per_step": [round(h["rewards/format_reward/mean"], 4) for h in steps]}
    print(json.dumps(result))  # the raw file's numbers (pytest -s)
    return result


def test_iou_rises_on_a_fixed_box_through_vllm(box_run):
    assert box_run["steps"] == list(range(1, STEPS + 1))  # one log per step: the means below compare real steps
    rises, first, best = iou_rises(box_run["iou_per_step"])
    assert rises, (first, best, box_run["iou_per_step"])


def test_the_check_rejects_a_flat_curve():
    """The check's control on literal curves (box-learning.json): the measured `--learning_rate 0` run fails it, and
    so does a curve with one lucky step; the CI run that collapsed after rising passes, a rise of less than 0.05
    fails."""
    lr0 = [0.0252, 0.0099, 0.0208, 0.0125, 0.012, 0.0111, 0.0085, 0.0032, 0.0174, 0.0216, 0.0151, 0.0085, 0.0122,
           0.0117, 0.0262, 0.014, 0.0135, 0.011, 0.0099, 0.009, 0.0418, 0.0104, 0.0163, 0.0137, 0.007, 0.0081, 0.0152,
           0.0063, 0.0096, 0.012]
    assert not iou_rises(lr0)[0]
    assert not iou_rises(lr0[:20] + [0.3] + lr0[21:])[0]  # one step of 0.3 is a window mean of about 0.07
    collapsed = [0.0232, 0.0195, 0.0269, 0.0194, 0.0565, 0.0345, 0.0205, 0.0445, 0.0182, 0.0034, 0.0038, 0.0293,
                 0.0354, 0.0586, 0.0406, 0.0603, 0.0577, 0.0576, 0.0674, 0.0688, 0.045, 0.0854, 0.1192, 0.0785, 0.1394,
                 0.1247, 0.0258, 0.0, 0.0, 0.0]
    assert iou_rises(collapsed)[0]
    assert not iou_rises([0.06] * 5 + [0.1] * 25)[0]  # above 0.08, but only 0.04 above the start
    recorded = [0.0252, 0.0079, 0.0041, 0.0168, 0.0427] + [0.2] * 20 + [0.5464, 0.5306, 0.5415, 0.5714, 0.5581]
    assert iou_rises(recorded)[0]
