"""Fault injection (issue 14 item 5), CPU, 2-process ZeRO-3 through `accelerate launch`, the tiny model: after each
fault the next run of the same command finishes with a continuous step count from the last good checkpoint.

One real run (2 steps, a checkpoint per step) is shared by every test through `base_run`; each test copies it and
continues it from step 2, with faults injected:
- in a row on one copy, each run resuming what the one before it left: kill -9 of one rank at named points of step 3's
  save (the test-only hook `VLM_GRPO_FAULT=<rank>:<point>`, code/vlm-grpo/checkpoints.py FAULT_POINTS, makes that
  process SIGKILL itself there); a full disk during that save (a file-size limit, RLIMIT_FSIZE, on the launched
  processes, under which the optimizer shards cannot be written: Python ignores SIGXFSZ, so the write fails, as on a
  full disk, and torch.save reports `RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...`);
  SIGTERM to the launcher in the middle of training (as a preempted job gets it); then the run finishes;
- a truncated adapter and a missing optimizer shard in the newest checkpoint (written by the test);
- an unwritable output dir at start: a read-only mount (root) or a read-only folder.

`VLM_GRPO_RECORD_FAULTS=<path>` writes the table (fault, how injected, survived, steps lost, what the user sees) to
<path>; experiments/vlm-grpo/cpu-results/faults.json is that file:
    VLM_GRPO_RECORD_FAULTS=experiments/vlm-grpo/cpu-results/faults.json \\
        .venv/bin/python -m pytest tests/test_faults.py tests/test_resume.py -q
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import _forkserver
import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)

from checkpoints import checkpoint_problem
from flexai_stub import offline_seed_script_args
from test_train_cpu import FAST, REPO, env, launch_cmd

pytestmark = pytest.mark.slow

LR = 1e-3  # FAST's learning rate
_BASE: dict[str, Path] = {}


def script_args(model, out: Path, steps: int, extra=()) -> list[str]:
    # save_steps 1: every step is a checkpoint, so the step a fault loses is measurable
    return [*offline_seed_script_args(model, out), "--max_steps", str(steps), *FAST, "--save_steps", "1", *extra]


def launch(model, out: Path, steps: int, processes: int = 2, extra=(), extra_env=None, preexec_fn=None,
           timeout: int = 420) -> subprocess.CompletedProcess:
    """The offline seed command under `accelerate launch`, its output captured: the launcher a fork of the launcher's
    server (tests/_forkserver.py), a real process where a `preexec_fn` must run in it."""
    cmd = launch_cmd("code/vlm-grpo/grpo_vlm.py", script_args(model, out, steps, extra), num_processes=processes)
    run_env = {**env(), **(extra_env or {})}
    if preexec_fn is None:
        return _forkserver.launch(cmd, cwd=REPO, env=run_env, timeout=timeout)
    return _proc.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout,
                     preexec_fn=preexec_fn)


def base_run(model) -> Path:
    """A finished 2-process run of 2 steps with checkpoint-1 and checkpoint-2, made once per test session (shared with
    test_resume.py); tests copy it."""
    if "run" not in _BASE:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="faults-base-")) / "run"
        proc = launch(model, out, steps=2)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert all(checkpoint_problem(out / f"checkpoint-{s}", 2, True) is None for s in (1, 2))
        _BASE["run"], _BASE["proc"] = out, proc
    return _BASE["run"]


def test_the_base_run_trains_the_seed_flags_under_zero3_with_checkpointing(tiny_model):
    """The offline seed flags (+ FAST), 2 ZeRO-3 CPU processes, gradient checkpointing: trained, adapter saved."""
    out = base_run(tiny_model)
    assert f"saved: {out / 'adapter_model.safetensors'}" in _BASE["proc"].stdout
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


def logged_steps(checkpoint: Path) -> list[int]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [h["step"] for h in state["log_history"] if "loss" in h]


def record(fault: str, injected: str, survived: bool, steps_lost: int | None, user_sees: str, **extra) -> None:
    """One row of the fault table, when VLM_GRPO_RECORD_FAULTS names the file (rows are kept by fault)."""
    path = os.environ.get("VLM_GRPO_RECORD_FAULTS")
    if not path:
        return
    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else {}
    table.update({
        "what": "fault-injection tests: tests/test_faults.py and tests/test_resume.py (slow), tiny Qwen2.5-VL, "
                "`synthetic`, 2-process ZeRO-3 on CPU (gloo) under accelerate launch, a checkpoint every step",
        "command": "VLM_GRPO_RECORD_FAULTS=experiments/vlm-grpo/cpu-results/faults.json .venv/bin/python -m pytest "
                   "tests/test_faults.py tests/test_resume.py -q",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}",
    })
    rows = {row["fault"]: row for row in table.get("rows", [])}
    rows[fault] = {"fault": fault, "injected": injected, "survived": survived, "steps_lost": steps_lost,
                   "user_sees": user_sees, **extra}
    table["rows"] = list(rows.values())
    table["recorded"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(json.dumps(table, indent=1) + "\n")


def copy_base(tiny_model, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run(tiny_model), out)
    return out


def first_line(text: str, *needles: str) -> str:
    """The first line containing any needle, with this test's temporary folder cut from it."""
    for line in text.splitlines():
        if any(n in line for n in needles):
            return line.split(" grpo_vlm: ")[-1].strip()
    return ""


def stop_once_training(cmd: list[str], log: Path, signum: int, start_s: float, stop_s: float) -> tuple[int, str]:
    """Start `cmd` (the output to a file, not a pipe nobody drains while the test polls; the launcher a fork of the
    launcher's server, tests/_forkserver.py), send `signum` to the launcher only (as a job's main process gets it) once
    a step has been logged, within `start_s`; return (launcher status, log) once it has stopped, within `stop_s`."""
    with _forkserver.started_launch(cmd, cwd=REPO, env=env(), log=log) as proc:
        deadline = time.monotonic() + start_s
        while log.read_text(errors="replace").count("'loss'") < 1:
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.2)
        proc.send_signal(signum)
        status = proc.wait(timeout=stop_s)
    return status, log.read_text(errors="replace")


def finish_from(tiny_model, out: Path, resumed: int, steps: int = 3) -> subprocess.CompletedProcess:
    """The same command again: it must resume `checkpoint-<resumed>` and end at `steps` with a continuous count."""
    proc = launch(tiny_model, out, steps=steps)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resuming from {out / f'checkpoint-{resumed}'} (step {resumed})" in proc.stderr
    assert logged_steps(out / f"checkpoint-{steps}") == list(range(1, steps + 1))
    assert checkpoint_problem(out / f"checkpoint-{steps}", 2, True) is None
    return proc


# ---- kill -9 of one rank during a save, a full disk, SIGTERM: in a row ----------------------------------------------


KILL_POINTS = [
    (1, "before_optimizer"),  # rank 1 dies after the adapter is written, before its optimizer shard
    (0, "after_files"),  # rank 0 has written everything, rank 1 waits at the barrier
    (0, "before_rename"),  # every file of every rank is written, the rename has not happened
]


def test_kill9_at_each_point_of_a_save_then_a_full_disk_then_sigterm_each_resumed(tiny_model, tmp_path):
    """Five faults in a row on one copy of the base run (2 steps, a checkpoint each), each run resuming where the one
    before it left off: kill -9 of one rank at each of three points of step 3's save (each killed run first resumes
    checkpoint-2: what the kill before it left is not taken for a checkpoint), a full disk during that save, then a
    SIGTERM once step 3 is trained; the same command then finishes. Six launches prove what ten did when each fault had
    a copy of the base run and a finishing run of its own."""
    out = copy_base(tiny_model, tmp_path)
    resumed_2 = f"resuming from {out / 'checkpoint-2'} (step 2)"

    # kill -9 of one rank during a save
    for earlier, (rank, point) in enumerate(KILL_POINTS):
        killed = launch(tiny_model, out, steps=3, extra_env={"VLM_GRPO_FAULT": f"{rank}:{point}"})
        assert killed.returncode != 0
        assert resumed_2 in killed.stderr
        assert f"rank {rank} SIGKILLs itself at {point}" in killed.stdout
        assert "exitcode  : -9" in killed.stderr and "Signal 9 (SIGKILL)" in killed.stderr  # the launcher's report
        assert not (out / "checkpoint-3").exists(), "a partial save never carries a checkpoint's name"
        assert (out / ".partial-checkpoint-3").is_dir()
        assert len(list(out.glob(".partial-checkpoint-3.crashed-*"))) == earlier, "each earlier one moved aside"

    # a full disk during the save: a file-size limit under which the adapter fits and an optimizer shard does not
    adapter = (out / "checkpoint-2" / "adapter_model.safetensors").stat().st_size
    shard = max(p.stat().st_size for p in (out / "checkpoint-2" / "global_step2").glob("*_optim_states.pt"))
    limit = (adapter + shard) // 2
    assert adapter < limit < shard

    def file_size_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    full = launch(tiny_model, out, steps=3, preexec_fn=file_size_limit)
    assert full.returncode != 0
    assert resumed_2 in full.stderr
    # torch.save's zip writer does not pass the OSError on: it finds its write position short and says so
    seen = first_line(full.stderr, "unexpected pos", "File too large")
    assert seen, full.stderr[-3000:]
    assert not (out / "checkpoint-3").exists()
    # where it failed: step 3 trained (logged), then its save began in the staging folder and stopped there
    assert (full.stdout + full.stderr).count("'loss'") == 1, "step 3 was trained and logged before the save"
    staged = out / ".partial-checkpoint-3" / "checkpoint-3"
    assert (staged / "adapter_model.safetensors").stat().st_size == adapter, "the adapter (under the limit) was saved"
    shards = sorted(staged.glob("global_step3/*_optim_states.pt"))
    assert len(shards) == 2 and {p.stat().st_size for p in shards} == {limit}, "the optimizer shards were cut there"
    assert checkpoint_problem(staged, 2, True) is not None, "never taken for a checkpoint"
    assert len(list(out.glob(".partial-checkpoint-3.crashed-*"))) == len(KILL_POINTS)

    # SIGTERM to the launcher once step 3 is trained, as a preempted job gets it
    cmd = launch_cmd("code/vlm-grpo/grpo_vlm.py", script_args(tiny_model, out, 8, ["--save_steps", "100"]))
    status, text = stop_once_training(cmd, tmp_path / "stopped.log", signal.SIGTERM, start_s=300, stop_s=120)
    assert resumed_2 in text
    line = first_line(text, "stopped by SIGTERM")
    assert line, text[-4000:]
    stopped = int(line.split("after step ")[1].split(":")[0])
    assert 3 <= stopped < 8
    assert line == (f"stopped by SIGTERM after step {stopped}: checkpoint-{stopped} saved in {out}; run the same "
                    "command to resume (exit status 143)")
    assert status != 0
    assert checkpoint_problem(out / f"checkpoint-{stopped}", 2, True) is None
    assert not (out / f"checkpoint-{stopped + 1}").exists()

    finish_from(tiny_model, out, resumed=stopped, steps=stopped + 1)
    stale = list(out.glob(".partial-checkpoint-3.crashed-*"))
    assert len(stale) == len(KILL_POINTS) + 1 and all(any(s.rglob("*")) for s in stale), \
        "the crashed saves (three kills, the full disk) are moved aside, not deleted"

    for rank, point in KILL_POINTS:
        record(f"kill -9 of rank {rank} during a save ({point})", f"`VLM_GRPO_FAULT={rank}:{point}`", True, 1,
               "the launcher's `ChildFailedError` with `exitcode : -9` (`Signal 9 (SIGKILL)`); the next run logs "
               "`resuming from .../checkpoint-2 (step 2)`",
               resumed_from=2, final_steps=list(range(1, stopped + 2)))
    record("full disk during a save", f"`RLIMIT_FSIZE` of {limit} bytes on the launched processes (the adapter "
           "fits, an optimizer shard does not)", True, 1,
           f"`{seen.split(']: ', 1)[-1]}` in the save (a process dies); the next run resumes checkpoint-2",
           resumed_from=2, final_steps=list(range(1, stopped + 2)))
    record("SIGTERM mid-step", f"SIGTERM to the `accelerate launch` process once step 3 is logged (the run stopped "
           f"after step {stopped})", True, 0,
           "`stopped by SIGTERM after step N: checkpoint-N saved in ...; run the same command to resume (exit status "
           "143)`", stopped_at=stopped, launcher_exit_status=status)


# ---- damaged files in the newest checkpoint -----------------------------------------------------------------------


def test_damaged_newest_checkpoints_fall_back_to_the_last_whole_one(tiny_model, tmp_path):
    """Both damages in one run: checkpoint-3 (a copy of checkpoint-2 saved as step 3) lacks an optimizer shard and
    checkpoint-2's adapter is truncated; the run skips both, each named in one warning, and resumes checkpoint-1."""
    out = copy_base(tiny_model, tmp_path)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 3}))
    shard = next((out / "checkpoint-3").glob("global_step2/zero_pp_rank_1_*_optim_states.pt"))
    shard.unlink()
    adapter = out / "checkpoint-2" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])
    cases = {  # checkpoint: (damage, what the warning says, how it was injected)
        3: ("missing optimizer shard", "global_step2/ lacks optim shard of rank 1",
            f"`checkpoint-3/global_step2/{shard.name}` deleted (checkpoint-3: checkpoint-2 saved as step 3)"),
        2: ("truncated adapter", "adapter_model.safetensors is unreadable",
            "`checkpoint-2/adapter_model.safetensors` cut to 1000 bytes"),
    }
    damaged = {step: sorted(p.relative_to(out / f"checkpoint-{step}") for p in (out / f"checkpoint-{step}").rglob("*"))
               for step in cases}

    proc = launch(tiny_model, out, steps=3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    warnings = [line.split(" grpo_vlm: ")[-1].strip() for line in proc.stderr.splitlines()
                if "skipping a damaged checkpoint" in line]
    assert len(warnings) == 2, warnings
    for warning, (step, (_, said, _)) in zip(warnings, cases.items()):  # newest first
        ckpt = out / f"checkpoint-{step}"
        assert warning.startswith(f"skipping a damaged checkpoint: {ckpt}: ") and said in warning
    assert f"resuming from {out / 'checkpoint-1'} (step 1)" in proc.stderr
    assert logged_steps(out / "checkpoint-3") == [1, 2, 3]
    for step, (damage, said, injected) in cases.items():
        assert checkpoint_problem(out / f"checkpoint-{step}", 2, True) is None, f"step {step} saved again, whole"
        aside = list(out.glob(f".checkpoint-{step}.replaced-*"))
        assert len(aside) == 1 and sorted(p.relative_to(aside[0]) for p in aside[0].rglob("*")) == damaged[step], \
            "the damaged checkpoint is kept, moved aside"
        record(f"{damage} in the newest checkpoint", injected, True, 1,
               f"`skipping a damaged checkpoint: .../checkpoint-{step}: {said} ...`, then `resuming from "
               ".../checkpoint-1`",
               resumed_from=1, final_steps=[1, 2, 3])


# ---- unwritable output dir ------------------------------------------------------------------------------------------


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount is what refuses it
        mounted = _proc.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                            capture_output=True, text=True, timeout=60)
        if mounted.returncode != 0:
            pytest.skip(f"root without a read-only mount: {mounted.stderr.strip()}")
        yield folder
        _proc.run(["umount", str(folder)], check=False, timeout=60)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_unwritable_output_dir_fails_before_training(tiny_model, read_only_dir):
    out = read_only_dir / "run"
    start = time.time()
    proc = _forkserver.run(str(REPO / "code/vlm-grpo/grpo_vlm.py"), script_args(tiny_model, out, 2), env=env(),
                           timeout=120)
    took = time.time() - start
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --output_dir {out} cannot be written ("), proc.stderr
    assert "plan:" not in proc.stderr and "Traceback" not in proc.stderr, "stopped before data, model and training"
    record("unwritable output dir at start", "a read-only tmpfs mount (root) or a mode 555 folder", True, 0,
           f"`{errors[0].replace(str(read_only_dir), '<dir>')}`", seconds_to_fail=round(took, 1))
