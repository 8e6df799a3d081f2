"""scripts/smoke.sh (behind `make smoke`) when the run fails: the run's exit status, its first error in one line, and
the previous result left in place. The successful path is the seed command through vLLM colocate, run by
tests/test_vllm_colocate.py; `make smoke` itself is what the README's first command runs."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)

from _tiny import REPO


@pytest.mark.slow
def test_failed_smoke_exits_with_the_runs_status_and_keeps_the_previous_result(tiny_model, tmp_path):
    smoke = tmp_path / "smoke"
    shutil.copytree(tiny_model, smoke / "tiny-qwen2.5-vl")
    previous = smoke / "run" / "adapter_model.safetensors"
    previous.parent.mkdir(parents=True)
    previous.write_bytes(b"the previous run's adapter")
    env = {**os.environ, "VPY": sys.executable, "SMOKE_DIR": str(smoke), "SMOKE_STEPS": "1",
           "SMOKE_ARGS": "--reward_funcs no_such_reward"}
    proc = _proc.run(["bash", "scripts/smoke.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "smoke run failed (exit 1)" in proc.stderr
    assert ("error: unknown reward function 'no_such_reward' (--reward_funcs): choose from ['accuracy', 'digit_ratio', "
            "'format', 'iou', 'tag_count'], or name your own as path/to/file.py:function or package.module:function"
            in proc.stderr), proc.stderr  # the run's own line
    assert previous.read_bytes() == b"the previous run's adapter"
    assert f"the previous result in {smoke / 'run'} is untouched" in proc.stderr
    assert str(previous) not in proc.stdout.splitlines()[-1:], "no adapter path printed for a failed run"
