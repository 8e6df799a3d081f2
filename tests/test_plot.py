"""scripts/plot_training.py: a real PNG with a panel for each metric the run logged, from any folder that holds a
trainer_state.json; y axes that do not magnify noise; a title that names the run; one line when there is nothing to
plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)
from _tiny import REPO
from PIL import Image

import plot_training

PANEL_TITLES = ["Total reward", "Reward: format", "Reward: accuracy", "Completion length", "PPO clip ratio", "Entropy"]


def log_entry(step: int) -> dict:
    """One step's log as TRL 1.2's GRPOTrainer writes it (keys copied from a real run's trainer_state.json)."""
    acc, fmt = min(1.0, step / 20), min(1.0, step / 10)
    return {
        "step": step, "epoch": step / 100, "loss": 0.01, "grad_norm": 0.3, "learning_rate": 1e-5,
        "completions/mean_length": 100 - step, "completions/min_length": 50, "completions/max_length": 128,
        "completions/clipped_ratio": 0.1, "rewards/format_reward/mean": fmt, "rewards/format_reward/std": 0.1,
        "rewards/accuracy_reward/mean": acc, "rewards/accuracy_reward/std": 0.1, "reward": acc + fmt,
        "reward_std": 0.2, "frac_reward_zero_std": 0.0, "entropy": 2 - step / 40, "clip_ratio/low_mean": 0.0,
        "clip_ratio/low_min": 0.0, "clip_ratio/high_mean": 0.01, "clip_ratio/high_max": 0.02,
        "clip_ratio/region_mean": 0.01, "step_time": 1.0,
    }


def write_state(folder, steps=range(1, 31), extra=(), entry=log_entry, logging_steps=1):
    folder.mkdir(parents=True, exist_ok=True)
    history = [entry(s) for s in steps] + list(extra)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": max(steps, default=4),
                                                           "logging_steps": logging_steps, "log_history": history}))
    return folder / "trainer_state.json"


def test_png_has_a_panel_per_logged_metric(tmp_path):
    state = write_state(tmp_path / "run" / "checkpoint-30", extra=[{"train_runtime": 10.0, "step": 30}])
    out = plot_training.main([str(tmp_path / "run")])
    assert out == state.parent / "training_curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(out)
    image.verify()
    image = Image.open(out)
    assert image.size == (1500, 800)  # 3 x 2 panels of 5 x 4 inches at 100 dpi
    assert image.text["Description"].split("; ") == PANEL_TITLES
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # curves, not a blank page


def test_title_names_the_run_and_its_model_not_the_file(tmp_path):
    ckpt = tmp_path / "smoke" / "run" / "checkpoint-30"
    write_state(ckpt)
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "outputs/smoke/tiny-qwen2.5-vl"}))
    out = plot_training.main([str(ckpt / "trainer_state.json")])
    assert Image.open(out).text["Title"] == "GRPO run smoke/run on tiny-qwen2.5-vl: 30 logged steps (steps 1-30)"


def test_only_logged_metrics_get_panels(tmp_path):
    def digits_only(step):  # one reward function, no clip ratio, no entropy, no lengths
        return {"step": step, "reward": 0.1, "rewards/digit_ratio_reward/mean": 0.1}

    history = plot_training.load_history(write_state(tmp_path, entry=digits_only))
    assert list(plot_training.plot(history, tmp_path / "x.png")) == ["Reward: digit_ratio"]


def test_vllm_runs_get_the_importance_sampling_panel(tmp_path):
    def with_vllm(step):
        return {**log_entry(step), "sampling/importance_sampling_ratio/mean": 0.999,
                "sampling/importance_sampling_ratio/min": 0.99, "sampling/importance_sampling_ratio/max": 1.01}

    limits = plot_training.plot(plot_training.load_history(write_state(tmp_path, entry=with_vllm)), tmp_path / "x.png")
    assert list(limits) == [*PANEL_TITLES, "Importance-sampling ratio"]
    low, high = limits["Importance-sampling ratio"]
    assert low < 0.9 and high > 1.1  # 0.99..1.01 is no movement: at least 0.2 of axis around it


def test_noise_is_not_magnified(tmp_path):
    # the entropy of a real run that did not move: 6.1774..6.1782 filled a whole panel before the minimum span
    def flat(step):
        return {**log_entry(step), "entropy": 6.1774 + 0.0008 * (step % 2), "rewards/accuracy_reward/mean": 0.0}

    limits = plot_training.plot(plot_training.load_history(write_state(tmp_path, entry=flat)), tmp_path / "x.png")
    low, high = limits["Entropy"]
    assert low < 6.1774 and high > 6.1782 and high - low >= 0.5
    low, high = limits["Reward: accuracy"]  # all 0: the axis rests on 0 and shows 0.2 of reward, not -0.1..0.1
    assert low == pytest.approx(-0.01) and high == pytest.approx(0.21)
    low, high = limits["Reward: format"]  # a real rise keeps its own range
    assert low == pytest.approx(0.1 - 0.045) and high == pytest.approx(1.0 + 0.045)


def test_a_single_logged_step_is_plotted(tmp_path):
    state = write_state(tmp_path / "run" / "checkpoint-4", steps=[4], logging_steps=4)
    out = plot_training.main([str(tmp_path / "run")])
    assert Image.open(out).text["Description"].split("; ") == PANEL_TITLES
    assert "1 logged step (step 4)" in Image.open(out).text["Title"]
    assert state.parent / "training_curves.png" == out


def test_panels_and_series(tmp_path):
    history = plot_training.load_history(write_state(tmp_path))
    assert plot_training.reward_names(history) == ["format_reward", "accuracy_reward"]
    steps, entropy = plot_training.series(history, "entropy")
    assert steps == list(range(1, 31)) and entropy[0] == pytest.approx(2 - 1 / 40)


def test_moving_average():
    assert plot_training.moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert all(math.isclose(a, b) for a, b in zip(plot_training.moving_average([0.1] * 5, 3), [0.1] * 5))


def test_newest_checkpoint_wins(tmp_path):
    for step in (10, 200, 30):
        write_state(tmp_path / f"checkpoint-{step}", steps=range(1, step + 1))
    assert plot_training.find_trainer_state(tmp_path) == tmp_path / "checkpoint-200" / "trainer_state.json"


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "no trainer_state.json"),
    (lambda p: write_state(p, steps=[], logging_steps=200).parent,
     r"no logged step: the run logged every 200 steps and stopped at step 4.*--logging_steps 1"),
])
def test_bad_inputs(tmp_path, setup, message):
    with pytest.raises(plot_training.PlotError, match=message):
        plot_training.load_history(plot_training.find_trainer_state(setup(tmp_path)))


def test_cli_error_is_one_line(tmp_path):
    proc = _proc.run([sys.executable, "scripts/plot_training.py", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error: no trainer_state.json")


def test_a_run_that_logged_nothing_says_how_to_get_curves(tmp_path):
    # `make smoke`: the seed's --logging_steps 200, 4 steps, so its checkpoint's log_history is empty
    write_state(tmp_path / "run" / "checkpoint-4", steps=[], logging_steps=200)
    proc = _proc.run([sys.executable, "scripts/plot_training.py", str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and 'make smoke SMOKE_ARGS="--logging_steps 1"' in line


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys, where nobody may create folders")
def test_an_unwritable_output_is_one_line(tmp_path):
    write_state(tmp_path / "run" / "checkpoint-30")
    proc = _proc.run([sys.executable, "scripts/plot_training.py", str(tmp_path / "run"),
                           "--output", "/sys/vlm-grpo-plot/curves.png"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: cannot write /sys/vlm-grpo-plot/curves.png (") and "--output" in line
