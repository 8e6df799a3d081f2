"""scripts/plot_training.py: a real PNG with the six panels, from any folder that holds a trainer_state.json."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from _tiny import REPO
from PIL import Image

import plot_training

PANEL_TITLES = ["Reward per function", "Accuracy", "Format rate", "Completion length", "PPO clip ratio", "Entropy"]


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


def write_state(folder, steps=range(1, 31), extra=()):
    folder.mkdir(parents=True, exist_ok=True)
    history = [log_entry(s) for s in steps] + list(extra)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": max(steps, default=0), "logging_steps": 1,
                                                           "log_history": history}))
    return folder / "trainer_state.json"


def test_png_has_the_six_panels(tmp_path):
    state = write_state(tmp_path / "run" / "checkpoint-30", extra=[{"train_runtime": 10.0, "step": 30}])
    out = plot_training.main([str(tmp_path / "run")])
    assert out == state.parent / "training_curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(out)
    image.verify()
    image = Image.open(out)
    assert image.size == (1500, 800)
    assert image.text["Description"].split("; ") == PANEL_TITLES
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # curves, not a blank page


def test_panels_and_series(tmp_path):
    history = plot_training.load_history(write_state(tmp_path))
    assert plot_training.reward_names(history) == ["format_reward", "accuracy_reward"]
    steps, entropy = plot_training.series(history, "entropy")
    assert steps == list(range(1, 31)) and entropy[0] == pytest.approx(2 - 1 / 40)
    assert plot_training.plot(history, tmp_path / "x.png") == PANEL_TITLES


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
    (lambda p: write_state(p, steps=[]).parent, "no logged training steps.*--logging_steps"),
])
def test_bad_inputs(tmp_path, setup, message):
    with pytest.raises(plot_training.PlotError, match=message):
        plot_training.load_history(plot_training.find_trainer_state(setup(tmp_path)))


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/plot_training.py", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error: no trainer_state.json")
