"""Graceful stop on the seed's own path (issue 18 item 2): the seed command with `--use_vllm --vllm_mode colocate`,
2 ZeRO-3 processes under `accelerate launch` on CPU (vLLM's CPU build), stopped by SIGTERM (a preempted or stopped
job), then by SIGINT (Ctrl-C), each sent to the launcher only, as a job's main process gets it. Each stop finishes the
step, saves `checkpoint-N`, says so in one line with the worker's exit status, and the launcher exits with 1; the same
command then resumes, and the last run finishes with every step logged once.

The three runs also prove what the seed's vLLM run proved on its own before (the adapter saved whole, vLLM generating),
so that run is not repeated elsewhere. test_faults.py stops the transformers path mid-step."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import _forkserver
from test_faults import first_line, logged_steps, stop_once_training
from test_train_cpu import REPO, env, launch_cmd
from test_vllm_colocate import vllm_seed_args
from _vllm import require_vllm

pytestmark = pytest.mark.slow

STEPS = 6
LAUNCHER_EXIT = 1  # `accelerate launch` exits 1 when its torch elastic agent was signalled, whatever the workers' status


def seed_command(model, out: Path) -> list[str]:
    # logging every step: the test sees training under way; save_steps 100: only the stops and the end save
    return launch_cmd("code/vlm-grpo/grpo_vlm.py",
                      [*vllm_seed_args(model, out, STEPS), "--logging_steps", "1", "--save_steps", "100"])


def stop_line(text: str) -> str:
    line = first_line(text, "stopped by SIG")
    assert line, text[-4000:]
    return line


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    require_vllm()
    tmp = tmp_path_factory.mktemp("graceful-stop")
    out = tmp / "run"
    cmd = seed_command(tiny_model, out)
    term_status, term_log = stop_once_training(cmd, tmp / "sigterm.log", signal.SIGTERM, start_s=400, stop_s=240)
    int_status, int_log = stop_once_training(cmd, tmp / "sigint.log", signal.SIGINT, start_s=400, stop_s=240)
    finish = _forkserver.launch(cmd, cwd=REPO, env=env(), timeout=600)
    return {"out": out, "term": (term_status, term_log), "int": (int_status, int_log), "finish": finish}


def stopped_step(line: str) -> int:
    return int(line.split("after step ")[1].split(":")[0])


def test_sigterm_saves_stops_and_reports_143(runs):
    out, (status, text) = runs["out"], runs["term"]
    line = stop_line(text)
    step = stopped_step(line)
    assert 1 <= step < STEPS
    assert line == (f"stopped by SIGTERM after step {step}: checkpoint-{step} saved in {out}; run the same command "
                    "to resume (exit status 143)")
    assert status == LAUNCHER_EXIT
    # the agent itself was signalled: it raises SignalException and prints no per-worker table, so the workers' own
    # status (128 + 15) is the one their stop line states
    assert "SignalException: Process" in text and "got signal: 15" in text
    assert '"generation": "vLLM colocate"' in text


def test_sigint_saves_stops_and_reports_130_after_resuming(runs):
    out = runs["out"]
    first = stopped_step(stop_line(runs["term"][1]))
    status, text = runs["int"]
    assert f"resuming from {out / f'checkpoint-{first}'} (step {first})" in text
    line = stop_line(text)
    step = stopped_step(line)
    assert first < step < STEPS
    assert line == (f"stopped by SIGINT after step {step}: checkpoint-{step} saved in {out}; run the same command "
                    "to resume (exit status 130)")
    assert status == LAUNCHER_EXIT
    assert "SignalException: Process" in text and "got signal: 2" in text


def test_the_same_command_finishes_with_every_step_once(runs):
    from safetensors import safe_open

    out, proc = runs["out"], runs["finish"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    second = stopped_step(stop_line(runs["int"][1]))
    assert f"resuming from {out / f'checkpoint-{second}'} (step {second})" in proc.stderr
    assert logged_steps(out / f"checkpoint-{STEPS}") == list(range(1, STEPS + 1)), "no step repeated or skipped"
    adapter = out / "adapter_model.safetensors"
    assert f"saved: {adapter}" in proc.stdout
    with safe_open(str(adapter), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    # q_proj and v_proj of both tiny language-model layers, A and B each: nothing empty (trl#4416)
    assert len(shapes) == 8 and all(s and 0 not in s for s in shapes.values()), shapes
