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

import _forkserver
from _tiny import REPO
from test_train_cpu import env, launch_cmd
from test_vllm_colocate import vllm_seed_args

pytestmark = pytest.mark.slow

# 112 px: synthetic_data's side, the one the warm-up's prompts had, and a multiple of 28, so the frame Qwen2.5-VL
# states boxes in (the processor's resize) is the stored one and the iou reward's rescaling is the identity.
SIDE = 112
# The lower-right quarter-and-more: most of the warm-up's random boxes (make_tiny_model.random_box: x2, y2 drawn up to
# the far edge) overlap it a little (89 % of 20,000 have iou > 0, mean 0.137), so nearly every group of 8 rollouts has
# iou variance to learn from. The first box, [8, 8, 40, 40], was overlapped by 15 % (mean 0.018): most groups held
# eight zeros, and the rise depended on a few lucky overlaps (one run in six stayed flat; box-learning.json, `earlier`).
BOX = (40, 40, 104, 104)
STEPS = 30

# The flags besides the seed's (vllm_seed_args): the own-task jsonl, both rewards, and learning_demo's GROUNDING_FLAGS
# except the lr: 5e-3 (on the varying-box `grounding` task 1e-2 broke the answer form:
# cpu-results/grounding-learning-attempts.json), plus a KL term, --beta 0.04 (TRL 1.2's default is 0).
# Why the KL term (box-learning.json, `collapse`): at lr 5e-3 one update can break the answer form of every rollout
# (format 0.81 -> 0.0 in one step). Without a KL term that is for good: eight rollouts that all score 0 have no
# advantage, so no gradient, and nothing pulls the policy back; CI's run at df4737b lost the form at step 3 (seed 42)
# and step 7 (seed 43) and scored 0 to step 30. Here 3 runs of 17 without it ended at iou 0 (two lost the form, one
# kept it around boxes that miss; Adam's epsilon at 1e-6 or a 5-step lr warm-up did not help). The KL term to the
# warm-up model pulls the policy back: 10 runs of 10 rose, 4 of them after format fell to 0.125 or less, at about 12 s
# more a run (the reference model's forward).
FLAGS = ["--eval_fraction", "0", "--reward_funcs", "format", "iou",
         "--lr_scheduler_type", "constant", "--learning_rate", "5e-3", "--beta", "0.04",
         "--use_peft", "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj", "lm_head",
         "--per_device_train_batch_size", "16", "--num_generations", "8",  # two questions a process, 8 boxes each
         "--max_completion_length", "40",  # the taught answer is about 30 tokens
         "--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", str(STEPS), "--report_to", "none"]
# The rise is a statistical outcome: CPU runs are not bit-reproducible after step 1, and before the KL term one run in
# nine from the calibrated warm-up stayed flat (box-learning.json, `flat_runs`: best window 0.15). So a flat first run
# (seed 42, the recorded runs' seed) gets one more with another seed; a broken weight sync or learning switched off
# (the file's `--learning_rate 0` control, best window 0.134) would be flat in both, and the test fails.
RETRY_SEEDS = (42, 43)


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


def box_run_args(model, data, out, seed: int = 42) -> list[str]:
    return [*vllm_seed_args(model, out, STEPS), "--dataset_name", str(data), *FLAGS, "--seed", str(seed)]


def iou_rises(iou: list[float]) -> tuple[bool, float, float]:
    """The check: the best mean iou over 5 consecutive steps at least 0.22, and at least 0.08 above the first 5 steps'.
    The peak, not the last steps: at lr 5e-3 the tiny policy can lose its answer form for a few steps (format 0.0 at
    step 10 of one run, taking iou with it, before the KL term brought it back). Measured (box-learning.json): best
    windows 0.315 to 0.706 over starts of 0.12 to 0.15 in ten runs; with `--learning_rate 0` the best window is 0.134
    over a start of 0.116 (per-step noise about 0.03), so both bounds sit well above what a flat run reaches."""
    first = sum(iou[:5]) / 5
    best = max(sum(iou[i:i + 5]) / 5 for i in range(len(iou) - 4))
    return best >= 0.22 and best >= first + 0.08, first, best


@pytest.fixture(scope="module")
def box_run(tmp_path_factory):
    from _vllm import require_vllm

    import learning_demo

    require_vllm()
    tmp = tmp_path_factory.mktemp("box-learning")
    model = learning_demo.grounding_model(tmp)  # the untied tiny model, taught the answer form (150 steps)
    data = write_box_jsonl(tmp / "data")

    def run(seed: int) -> dict:
        out = tmp / f"run-seed-{seed}"
        proc = _forkserver.launch(launch_cmd("code/vlm-grpo/grpo_vlm.py", box_run_args(model, data, out, seed)),
                                  cwd=REPO, env=env(), timeout=900)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
        history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
        steps = [h for h in history if "rewards/iou_reward/mean" in h]
        result = {"seed": seed, "steps": [h["step"] for h in steps],
                  "iou_per_step": [round(h["rewards/iou_reward/mean"], 4) for h in steps],
                  "format_per_step": [round(h["rewards/format_reward/mean"], 4) for h in steps],
                  "kl_per_step": [round(h.get("kl", 0.0), 4) for h in steps]}  # TRL logs kl only with --beta
        print(json.dumps(result))  # the raw file's numbers (pytest -s)
        return result

    return attempts_until_rise(run)


def attempts_until_rise(run) -> list[dict]:
    """run(seed) for each of RETRY_SEEDS until one's iou rises; every attempt made."""
    attempts = []
    for seed in RETRY_SEEDS:
        attempts.append(run(seed))
        if iou_rises(attempts[-1]["iou_per_step"])[0]:
            break
    return attempts


def test_iou_rises_on_a_fixed_box_through_vllm(box_run):
    """The last attempt's iou rises; a second attempt (another seed) only after a flat first one."""
    for attempt in box_run:
        assert attempt["steps"] == list(range(1, STEPS + 1))  # one log per step: the means compare real steps
        # --beta reached the trainer: the KL to the reference is computed, and grows once the policy moves
        # (0 at step 1, before any update; a run with --beta 0 logs no KL at all)
        assert attempt["kl_per_step"][0] == 0 and max(attempt["kl_per_step"]) > 0.01, attempt["kl_per_step"]
    assert iou_rises(box_run[-1]["iou_per_step"])[0], [(a["seed"], iou_rises(a["iou_per_step"])[1:], a["iou_per_step"]) for a in box_run]


def test_a_second_seed_runs_only_after_a_flat_first_run():
    """attempts_until_rise on literal curves: a rise first is one attempt; flat then rising is two, and the test
    passes on the second; flat twice is two attempts and the test's check fails on the last."""
    flat, rise = [0.13] * 30, [0.13] * 10 + [0.4] * 20

    def fake(curves):
        return lambda seed: {"seed": seed, "iou_per_step": curves[seed]}

    assert [a["seed"] for a in attempts_until_rise(fake({42: rise, 43: rise}))] == [42]
    assert [a["seed"] for a in attempts_until_rise(fake({42: flat, 43: rise}))] == [42, 43]
    twice_flat = attempts_until_rise(fake({42: flat, 43: flat}))
    assert [a["seed"] for a in twice_flat] == [42, 43] and not iou_rises(twice_flat[-1]["iou_per_step"])[0]


def test_the_warm_up_is_taught_in_a_process_of_its_own(tmp_path):
    """learning_demo.grounding_model teaches the answer form in make_tiny_model's own process, so the model does not
    depend on what the caller loaded: here one warm-up step taught in this process, once IPEX is loaded (as it is in
    the suite after any test imported TRL), gives other weights than grounding_model's. If grounding_model taught in
    the caller's process, the two would be the same bytes (both deterministic: seeded, one process each)."""
    pytest.importorskip("intel_extension_for_pytorch")  # the vLLM CPU build's: the kernels that change the result
    import learning_demo
    import make_tiny_model

    apart = learning_demo.grounding_model(tmp_path / "apart", steps=1) / "model.safetensors"
    here = tmp_path / "here"
    make_tiny_model.build(here, preset="tiny-untied")
    make_tiny_model.teach_box_answers(here, steps=1)
    assert json.loads((apart.parent / "tiny_model_info.json").read_text())["box_answer_warmup"]["steps"] == 1
    assert apart.read_bytes() != (here / "model.safetensors").read_bytes()


def test_the_check_rejects_a_flat_curve():
    """The check's control on literal curves (box-learning.json): the measured `--learning_rate 0` run fails it, and
    so do a curve with one lucky step and a rise of less than 0.08; the weakest measured run passes."""
    lr0 = [0.1793, 0.1151, 0.0859, 0.0874, 0.1142, 0.0886, 0.1326, 0.074, 0.1253, 0.1486, 0.1201, 0.0795, 0.1664,
           0.0979, 0.132, 0.1191, 0.1371, 0.1414, 0.125, 0.1321, 0.1359, 0.0871, 0.1352, 0.0849, 0.0845, 0.145, 0.0756,
           0.0682, 0.1073, 0.0909]
    assert not iou_rises(lr0)[0]
    assert not iou_rises(lr0[:20] + [0.5] + lr0[21:])[0]  # one step of 0.5: its best window's mean is 0.207
    assert not iou_rises([0.16] * 5 + [0.23] * 25)[0]  # above 0.22, but only 0.07 above the start
    weakest = [0.1793, 0.1178, 0.1733, 0.1704, 0.1929, 0.2828, 0.2178, 0.1219, 0.1413, 0.1522, 0.1418, 0.1622, 0.2107,
               0.1935, 0.2485, 0.2639, 0.2433, 0.2257, 0.2755, 0.346, 0.3566, 0.3138, 0.1464, 0.284, 0.3702, 0.1693,
               0.1475, 0.1009, 0.178, 0.2691]  # before_kl.other_runs[0]: best window 0.304 over a start of 0.167
    assert iou_rises(weakest)[0]
    collapsed = [0.1921, 0.1349, 0.13, 0.1195, 0.1666, 0.008] + [0.0] * 24  # collapse.ci_run_df4737b, seed 43
    assert not iou_rises(collapsed)[0]
