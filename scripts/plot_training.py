#!/usr/bin/env python
"""Training curves of a GRPO run, as one PNG: rewards per function, accuracy, format rate, completion length,
PPO clip ratio and entropy over steps, read from the run's `trainer_state.json`.

    python scripts/plot_training.py outputs/smoke/run                     # newest checkpoint-N/ of a run
    python scripts/plot_training.py <fetched-checkpoint>/trainer_state.json --output curves.png

The argument is a `trainer_state.json`, a checkpoint folder holding one, or a run's `--output_dir` (its newest
`checkpoint-N/`; the Trainer saves one at the last step, so that one has the whole history). The values are what
the trainer logged every `--logging_steps`: use a small value (e.g. `--logging_steps 10`) for useful curves. Each
panel shows the logged points faintly and a moving average boldly, so the trend reads at a glance on noisy RL
curves. Panels whose metric the run did not log (e.g. accuracy when training without the `accuracy` reward) say so.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# (title, y label): the figure's panels, in reading order; tests and the PNG's metadata use these titles
PANELS = (
    ("Reward per function", "mean reward"),
    ("Accuracy", "accuracy reward (fraction correct)"),
    ("Format rate", "format reward (fraction well-formed)"),
    ("Completion length", "tokens"),
    ("PPO clip ratio", "fraction of tokens clipped"),
    ("Entropy", "nats per token"),
)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class PlotError(ValueError):
    """No usable training state: the message says what was expected."""


def find_trainer_state(path: str | Path) -> Path:
    """`trainer_state.json` from a file, a checkpoint folder or a run folder (newest checkpoint)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise PlotError(f"{p} does not exist: pass a trainer_state.json, a checkpoint-N folder or a run's --output_dir")
    if (p / "trainer_state.json").is_file():
        return p / "trainer_state.json"
    checkpoints = sorted(
        (int(m.group(1)), d) for d in p.iterdir() if d.is_dir() and (m := _CHECKPOINT_RE.match(d.name))
    )
    for _, ckpt in reversed(checkpoints):
        if (ckpt / "trainer_state.json").is_file():
            return ckpt / "trainer_state.json"
    raise PlotError(f"no trainer_state.json in {p} or its checkpoint-N/ folders (the Trainer writes one per checkpoint)")


def load_history(state_file: Path) -> list[dict]:
    """The per-step training logs (entries with a reward), in step order."""
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as err:
        raise PlotError(f"{state_file} is not valid JSON: {err}") from err
    history = [e for e in state.get("log_history", []) if "reward" in e and "step" in e]
    if not history:
        raise PlotError(
            f"{state_file} has no logged training steps (log_history holds no `reward` entry): the run logged "
            f"every {state.get('logging_steps', '?')} steps and stopped at step {state.get('global_step', '?')}. "
            "Train with a smaller --logging_steps."
        )
    return sorted(history, key=lambda e: e["step"])


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in history if e.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def reward_names(history: list[dict]) -> list[str]:
    """Reward functions the run logged (`rewards/<name>/mean`), in first-seen order."""
    names = []
    for entry in history:
        for key in entry:
            m = re.match(r"^rewards/(.+)/mean$", key)
            if m and m.group(1) not in names:
                names.append(m.group(1))
    return names


def plot(history: list[dict], output: Path, title: str = "") -> list[str]:
    """Draw the panels into `output` (PNG); returns the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes or CI
    import matplotlib.pyplot as plt

    window = max(1, len(history) // 10)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    axes = dict(zip((t for t, _ in PANELS), axes.flat))

    def draw(ax, key, label, color=None):
        steps, values = series(history, key)
        if not steps:
            return False
        (line,) = ax.plot(steps, values, alpha=0.3, linewidth=1, color=color)
        ax.plot(steps, moving_average(values, window), linewidth=2, color=line.get_color(), label=label)
        return True

    def absent(ax, why):
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray", wrap=True)

    ax = axes["Reward per function"]
    names = reward_names(history)
    for name in names:
        draw(ax, f"rewards/{name}/mean", name.removesuffix("_reward"))
    if len(names) != 1:  # with one function the total is the same curve
        draw(ax, "reward", "total (weighted sum)", color="black")
    ax.legend(fontsize=8)

    for panel, func in (("Accuracy", "accuracy_reward"), ("Format rate", "format_reward")):
        if not draw(axes[panel], f"rewards/{func}/mean", func):
            absent(axes[panel], f"not logged: the run trained without\nthe `{func.removesuffix('_reward')}` reward")
        else:
            axes[panel].set_ylim(-0.02, 1.02)

    ax = axes["Completion length"]
    drew = [draw(ax, f"completions/{k}_length", k) for k in ("mean", "min", "max")]
    if any(drew):
        ax.legend(fontsize=8)
        steps, clipped = series(history, "completions/clipped_ratio")
        if steps:
            twin = ax.twinx()
            twin.plot(steps, clipped, color="tab:red", linestyle=":", linewidth=1.5, label="truncated fraction")
            twin.set_ylim(-0.02, 1.02)
            twin.set_ylabel("truncated at max_completion_length", color="tab:red", fontsize=8)
    else:
        absent(ax, "completion lengths not logged")

    ax = axes["PPO clip ratio"]
    drew = [draw(ax, f"clip_ratio/{k}", k) for k in ("region_mean", "low_mean", "high_mean")]
    if any(drew):
        ax.legend(fontsize=8)
    else:
        absent(ax, "clip ratio not logged")

    if not draw(axes["Entropy"], "entropy", "entropy"):
        absent(axes["Entropy"], "entropy not logged")

    for (panel, ylabel), ax in zip(PANELS, axes.values()):
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}  (faint: logged values; bold: moving average over {window} logs)".strip())
    output.parent.mkdir(parents=True, exist_ok=True)
    # The panel titles go into the PNG's text chunk, so a reader (or a test) can tell what the image holds.
    fig.savefig(output, dpi=100, metadata={"Title": title or "GRPO training curves",
                                           "Description": "; ".join(t for t, _ in PANELS)})
    plt.close(fig)
    return [t for t, _ in PANELS]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="trainer_state.json, a checkpoint-N folder, or a run's --output_dir")
    parser.add_argument("--output", help="PNG to write (default: training_curves.png beside trainer_state.json)")
    parser.add_argument("--title", help="figure title (default: the run folder and its last step)")
    args = parser.parse_args(argv)
    try:
        state_file = find_trainer_state(args.run)
        history = load_history(state_file)
    except PlotError as err:
        sys.exit(f"error: {err}")
    output = Path(args.output) if args.output else state_file.parent / "training_curves.png"
    title = args.title or f"{state_file.parent}: {len(history)} logged steps, last step {history[-1]['step']}"
    plot(history, output, title)
    print(output)
    return output


if __name__ == "__main__":
    main()
