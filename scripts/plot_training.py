#!/usr/bin/env python
"""Training curves of a GRPO run, as one PNG: total reward, one panel per reward function, completion length, PPO
clip ratio, entropy and (vLLM runs) the importance-sampling ratio over steps, read from the run's `trainer_state.json`.

    python scripts/plot_training.py outputs/smoke/run                     # newest checkpoint-N/ of a run
    python scripts/plot_training.py <fetched-checkpoint>/trainer_state.json --output curves.png

The argument is a `trainer_state.json`, a checkpoint folder holding one, or a run's `--output_dir` (its newest
`checkpoint-N/`; the Trainer saves one at the last step, so that one has the whole history). The values are what
the trainer logged every `--logging_steps`: use a small value (`--logging_steps 1` on short runs, 10 on long ones)
for useful curves; a run that stopped before its first log has nothing to plot, and the error says so.

How the figure reads: only what the run logged gets a panel. Each panel shows the logged points faintly and a moving
average boldly when there are enough points for a trend, markers when there are few. Lines that can coincide (the
clip ratios, all 0 without off-policy steps) are drawn widest first, so none hides another. Every y axis spans at
least a fixed amount (0.2 for a reward, 0.5 nats of entropy, ...), so noise in the fourth decimal stays flat instead
of filling the panel. The title names the run folder and its base model, not the path of the file.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Panel:
    """One panel: its lines (log key, legend label), y label, and the least y span it shows (see module docstring).
    `floor`: a bound the metric cannot go below (lengths, ratios, entropy are >= 0), kept as the axis' lower end
    when the data sit near it, so a span added for noise does not show impossible values."""

    title: str
    ylabel: str
    lines: tuple[tuple[str, str], ...]
    min_span: float
    floor: float | None = 0.0
    band: tuple[str, str] | None = None  # (low key, high key): drawn as a shaded range around the first line
    reference: float | None = None  # a horizontal line the metric should sit on


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
        # `make smoke` is such a run: the seed's --logging_steps 200 and 4 steps
        raise PlotError(
            f"{state_file} holds no logged step: the run logged every {state.get('logging_steps', '?')} steps and "
            f"stopped at step {state.get('global_step', '?')}, before its first log. For curves, train with "
            "--logging_steps 1 (`make smoke SMOKE_ARGS=\"--logging_steps 1\"`; on FlexAI e.g. "
            "ARGS=\"--logging_steps 10\")"
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


# What each reward of code/vlm-grpo/rewards.py measures, for its panel's y label; other names get "mean reward".
REWARD_MEANINGS = {
    "accuracy": "fraction of answers correct",
    "format": "fraction well-formed",
    "tag_count": "share of the 4 tags present once",
    "digit_ratio": "share of digits in the completion",
}


def panels_for(history: list[dict]) -> list[Panel]:
    """The panels this run's logs can fill, in reading order."""
    names = reward_names(history)
    candidates = []
    if len(names) != 1:  # with one function the total is that function's curve
        candidates.append(Panel("Total reward", "sum of the reward functions", (("reward", "total"),), 0.2))
    for name in names:
        short = name.removesuffix("_reward")
        candidates.append(Panel(f"Reward: {short}", REWARD_MEANINGS.get(short, "mean reward"),
                                ((f"rewards/{name}/mean", short),), 0.2))
    candidates += [
        Panel("Completion length", "tokens", (("completions/mean_length", "mean"),), 10.0,
              band=("completions/min_length", "completions/max_length")),
        Panel("PPO clip ratio", "fraction of tokens clipped",
              (("clip_ratio/region_mean", "region (all)"), ("clip_ratio/low_mean", "low"),
               ("clip_ratio/high_mean", "high")), 0.05),
        Panel("Entropy", "nats per token", (("entropy", "entropy"),), 0.5),
        Panel("Importance-sampling ratio", "trainer / vLLM probability",
              (("sampling/importance_sampling_ratio/mean", "mean"),), 0.2, floor=None,
              band=("sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/max"), reference=1.0),
    ]
    return [panel for panel in candidates if any(series(history, key)[0] for key, _ in panel.lines)]


def span_limits(values: list[float], min_span: float, floor: float | None) -> tuple[float, float]:
    """y limits that hold every value and span at least `min_span` (centred on the data, or resting on `floor` when
    centring would cross it), plus a 5 % margin."""
    lo, hi = min(values), max(values)
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
        if floor is not None and lo < floor <= min(values):
            lo, hi = floor, floor + min_span
    margin = 0.05 * (hi - lo)
    return lo - margin, hi + margin


def run_title(state_file: Path, history: list[dict]) -> str:
    """`GRPO run smoke/run on tiny-qwen2.5-vl: 4 logged steps (steps 1-4)`: the run folder's last two names (a
    checkpoint-N folder stands for its run) and the base model's name from the adapter's config, when it has one."""
    folder = state_file.parent.absolute()
    if _CHECKPOINT_RE.match(folder.name):
        folder = folder.parent
    run = "/".join(folder.parts[-2:]) if len(folder.parts) > 2 else folder.name
    base = ""
    try:
        recorded = json.loads((state_file.parent / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = f" on {Path(recorded.rstrip('/')).name}" if recorded else ""
    except (OSError, json.JSONDecodeError):
        pass
    first, last = history[0]["step"], history[-1]["step"]
    steps = f"step {first}" if first == last else f"steps {first}-{last}"
    return f"GRPO run {run}{base}: {len(history)} logged step{'s' if len(history) != 1 else ''} ({steps})"


def plot(history: list[dict], output: Path, title: str = "") -> dict[str, tuple[float, float]]:
    """Draw the panels into `output` (PNG); returns each drawn panel's title with its y limits, in reading order."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes or CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = panels_for(history)
    limits = {}
    cols = {1: 1, 2: 2, 3: 3, 4: 2, 5: 3, 6: 3, 9: 3}.get(len(panels), 4)  # rows as full as possible
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), constrained_layout=True, squeeze=False)
    window = max(1, len(history) // 10)
    markers = len(history) <= 30  # few points: a marker each, so a single log is a dot, not an invisible line

    for panel, ax in zip(panels, axes.flat):
        plotted = []
        drawn = [(key, label) for key, label in panel.lines if series(history, key)[0]]
        for i, (key, label) in enumerate(drawn):
            steps, values = series(history, key)
            plotted += values
            # widest and palest first, each next one narrower, dashed differently, the last one opaque: coinciding
            # lines stay visible as nested strokes
            width, style = (2 + 3 * (len(drawn) - 1 - i), ("-", "--", ":")[i % 3]) if len(drawn) > 1 else (2, "-")
            alpha = 1.0 if i == len(drawn) - 1 else 0.5
            marker = dict(marker="o", markersize=3 + 2 * (len(drawn) - 1 - i)) if markers else {}
            if window > 1:  # markers sit on the logged values, never on the average
                ax.plot(steps, values, alpha=0.3, linewidth=1, color=f"C{i}", **marker)
                ax.plot(steps, moving_average(values, window), linewidth=width, linestyle=style, color=f"C{i}",
                        label=label, alpha=alpha)
            else:
                ax.plot(steps, values, linewidth=width, linestyle=style, color=f"C{i}", label=label, alpha=alpha,
                        **marker)
        if panel.band:
            steps, low = series(history, panel.band[0])
            _, high = series(history, panel.band[1])
            if steps and len(low) == len(high):
                ax.fill_between(steps, low, high, color="C0", alpha=0.15, label="min-max")
                plotted += low + high
        if panel.reference is not None:
            ax.axhline(panel.reference, color="gray", linewidth=1, linestyle="--")
            plotted.append(panel.reference)
        limits[panel.title] = span_limits(plotted, panel.min_span, panel.floor)
        ax.set_ylim(*limits[panel.title])
        handles, labels = ax.get_legend_handles_labels()
        if panel.title == "Completion length":
            handles += _truncated_fraction(ax, history)
        if len(handles) > 1:
            ax.legend(handles=handles, fontsize=8, loc="best")
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    how = f"faint: logged values; bold: moving average over {window} logs" if window > 1 else "logged values"
    fig.suptitle(f"{title or 'GRPO training curves'}\n({how})")
    output.parent.mkdir(parents=True, exist_ok=True)
    # The panel titles go into the PNG's text chunk, so a reader (or a test) can tell what the image holds.
    fig.savefig(output, dpi=100, metadata={"Title": title or "GRPO training curves",
                                           "Description": "; ".join(panel.title for panel in panels)})
    plt.close(fig)
    return limits


def _truncated_fraction(ax, history: list[dict]) -> list:
    """The share of completions cut at --max_completion_length, on a second axis (lengths alone hide it); returns
    its legend handle, for the panel's one legend."""
    steps, clipped = series(history, "completions/clipped_ratio")
    if not steps:
        return []
    twin = ax.twinx()
    (line,) = twin.plot(steps, clipped, color="tab:red", linestyle=":", linewidth=1.5, label="truncated (right axis)",
                        marker="x" if len(steps) <= 30 else None)
    twin.set_ylim(-0.02, 1.02)
    twin.set_ylabel("fraction truncated at max_completion_length", color="tab:red", fontsize=8)
    return [line]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="trainer_state.json, a checkpoint-N folder, or a run's --output_dir")
    parser.add_argument("--output", help="PNG to write (default: training_curves.png beside trainer_state.json)")
    parser.add_argument("--title", help="figure title (default: the run folder, its base model and its steps)")
    args = parser.parse_args(argv)
    try:
        state_file = find_trainer_state(args.run)
        history = load_history(state_file)
    except PlotError as err:
        sys.exit(f"error: {err}")
    output = Path(args.output) if args.output else state_file.parent / "training_curves.png"
    try:
        plot(history, output, args.title or run_title(state_file, history))
    except OSError as err:  # a read-only run folder (a mounted checkpoint): say where to write instead
        sys.exit(f"error: cannot write {output} ({err.strerror or err}): pass --output <a PNG path you can write>")
    print(output)
    return output


if __name__ == "__main__":
    main()
