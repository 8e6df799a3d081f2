"""Every script's `--help` works: the README and the unknown-flag error point users at it (argparse formats help text
with %, so an unescaped percent sign in a help string crashes it)."""

from __future__ import annotations

import os

import pytest

import _forkserver  # every test process: time-bounded, whole tree killed (tests/_proc.py, tests/_forkserver.py)

from _tiny import REPO

LIBRARIES = {"model_presets.py"}  # modules in scripts/ that the scripts import, not scripts: no command line
SCRIPTS = ["code/vlm-grpo/grpo_vlm.py",
           *sorted(f"scripts/{p.name}" for p in (REPO / "scripts").glob("*.py") if p.name not in LIBRARIES)]


def test_the_libraries_in_scripts_have_no_command_line():
    for name in LIBRARIES:
        assert "__main__" not in (REPO / "scripts" / name).read_text(), f"{name} is a script: test its --help"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage(script):
    proc = _forkserver.run(script, ["--help"], env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_training_help_shows_percent_signs():
    proc = _forkserver.run("code/vlm-grpo/grpo_vlm.py", ["--help"], env=dict(os.environ), timeout=300)
    assert "+2 % training throughput" in " ".join(proc.stdout.split())
