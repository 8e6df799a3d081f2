"""Time one 2-process launch of the seed's vLLM flags the way the suite launches it (tests/test_train_cpu.launch_cmd,
tests/test_vllm_colocate.vllm_seed_args: the tiny model, 2 steps, 64-token completions), under the start-up settings
the suite's speed depends on. Not a test: a measurement, recorded in experiments/vlm-grpo/cpu-results/
suite-speedups.json.

    .venv/bin/python tests/time_launch.py --repeats 2 --out experiments/vlm-grpo/cpu-results/suite-speedups.json

Variants (each a fresh launch, in turn, `--repeats` times):
- `suite`: as the suite runs it (tests/conftest.py's inductor settings; grpo_vlm.py freezes the heap at exit);
- `no_inductor_env`: without TORCHINDUCTOR_VEC_ISA_OK / TORCHINDUCTOR_COMPILE_THREADS;
- `no_exit_freeze`: the script's exit freeze undone (an atexit handler calls gc.unfreeze(), so the interpreter's last
  collection scans everything again);
- `forked_launcher`: as `suite`, the launcher a fork of tests/_forkserver.py's launcher server (started before), and
  today its workers forks of it too (suite-speedups.json was recorded while the workers were still real processes).
Each record: the wall time of the launch and the seconds from the `saved:` line to the launcher's exit. Then
`one_process_refusal`: grpo_vlm.py refusing a bad flag, as a real process and as a fork of tests/_forkserver.py's
server; and `noop_launch`: `accelerate launch` of a 2-process script that does nothing, the launcher a real process
and a fork of the launcher server (what the launcher alone costs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "code" / "vlm-grpo"), str(HERE.parent / "scripts")]
# the suite's environment, set before the imports below import tests/_forkserver.py: its servers start with the
# environment it was first imported in (tests/conftest.py sets the same first)
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")  # as tests/conftest.py sets them
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  PYTHONUNBUFFERED="1")  # what test_train_cpu.env() adds: the launches' environment is the servers'
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # as conftest

import _proc  # noqa: E402
from test_train_cpu import REPO, env, launch_cmd  # noqa: E402
from test_vllm_colocate import vllm_seed_args  # noqa: E402

UNFREEZE = """import atexit, gc, runpy, sys
atexit.register(gc.unfreeze)
sys.argv[0] = {script!r}
sys.path.insert(0, {folder!r})
runpy.run_path({script!r}, run_name="__main__")
"""


def launch_once(model: Path, work: Path, variant: str) -> dict:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    entry = "code/vlm-grpo/grpo_vlm.py"
    run_env = env()
    if variant == "no_inductor_env":
        inductor = ("TORCHINDUCTOR_VEC_ISA_OK", "TORCHINDUCTOR_COMPILE_THREADS")
        run_env = {k: v for k, v in run_env.items() if k not in inductor}
    if variant == "no_exit_freeze":
        script = str(REPO / entry)
        wrapper = work / "unfrozen_grpo_vlm.py"
        wrapper.write_text(UNFREEZE.format(script=script, folder=str(Path(script).parent)))
        entry = str(wrapper)
    import _forkserver

    log = work / "launch.log"
    cmd = launch_cmd(entry, vllm_seed_args(model, out, 2))
    if variant == "forked_launcher":
        _forkserver.launcher_server(run_env)  # started before the clock, as the suite's first launch starts it
    start = time.monotonic()
    saved_at = None
    with contextlib.ExitStack() as stack:
        if variant == "forked_launcher":
            proc = stack.enter_context(_forkserver.started_launch(cmd, cwd=REPO, env=run_env, log=log))
        else:
            sink = stack.enter_context(log.open("w"))
            proc = stack.enter_context(_proc.started(cmd, cwd=REPO, env=run_env, stdout=sink,
                                                     stderr=subprocess.STDOUT))
        while proc.poll() is None:
            if saved_at is None and "saved: " in log.read_text(errors="replace"):
                saved_at = time.monotonic()
            assert time.monotonic() - start < 600, "launch over 10 minutes"
            time.sleep(0.05)
        status = proc.wait(timeout=30)
    end = time.monotonic()
    assert status == 0, log.read_text(errors="replace")[-3000:]
    return {"variant": variant, "wall_s": round(end - start, 2),
            "saved_to_exit_s": round(end - saved_at, 2) if saved_at else None}


NOOP = "import os\nos.write(1, f\"rank {os.environ['RANK']}\\n\".encode())\n"


def time_real_and_forked(repeats: int, real, forked, check) -> dict:
    """Seconds of `real()` and of `forked()` (each returns a CompletedProcess that `check` asserts on), in turn."""
    times = {"real_process_s": [], "fork_s": []}
    for _ in range(repeats):
        for key, run in (("real_process_s", real), ("fork_s", forked)):
            start = time.monotonic()
            proc = run()
            times[key].append(round(time.monotonic() - start, 2))
            check(proc)
    print(json.dumps(times), flush=True)
    return times


def time_noop_launches(work: Path, repeats: int) -> dict:
    """`accelerate launch` (the recipe's config, 2 processes) of a script that prints its rank and ends: the launcher
    as a real process, and as a fork of tests/_forkserver.py's launcher server (started before the first timed fork)."""
    import _forkserver

    script = work / "noop.py"
    script.write_text(NOOP)
    cmd, run_env = launch_cmd(str(script), []), env()
    _forkserver.launcher_server(run_env)

    def check(proc):
        assert proc.returncode == 0 and sorted(proc.stdout.split("\n"))[-2:] == ["rank 0", "rank 1"], proc.stdout

    return time_real_and_forked(
        repeats, lambda: _proc.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=300),
        lambda: _forkserver.launch(cmd, env=run_env, timeout=300), check)


def time_refusals(model: Path, work: Path, repeats: int) -> dict:
    """`grpo_vlm.py` refusing a bad flag (--max_image_side -1, the seed's offline flags otherwise), as a real process
    and as a fork of tests/_forkserver.py's server (started before the first timed fork)."""
    import _forkserver

    args = ["--model_name_or_path", model, "--dataset_name", "synthetic", "--output_dir", work / "refused",
            "--use_vllm", "--vllm_mode", "colocate", "--max_image_side", "-1", "--dry_run"]
    script, run_env = str(REPO / "code" / "vlm-grpo" / "grpo_vlm.py"), env()
    _forkserver.server()
    assert _forkserver.forks(script, run_env)

    def check(proc):
        assert proc.returncode == 1 and "--max_image_side must be >= 0" in proc.stderr, proc.stderr[-2000:]

    return time_real_and_forked(
        repeats, lambda: _proc.run([_proc.PYTHON, script, *map(str, args)], cwd=REPO, env=run_env,
                                   capture_output=True, text=True, timeout=300),
        lambda: _forkserver.run(script, args, env=run_env, timeout=300), check)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="suite,no_inductor_env,no_exit_freeze,forked_launcher")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from make_tiny_model import build

    records = []
    with tempfile.TemporaryDirectory(prefix="time-launch-") as tmp:
        model = build(Path(tmp) / "tiny-qwen2.5-vl", preset="tiny")
        launch_once(model, Path(tmp), "suite")  # warm-up: DeepSpeed's shm op build, inductor's cache
        for _ in range(args.repeats):
            for variant in args.variants.split(","):
                records.append(launch_once(model, Path(tmp), variant))
                print(json.dumps(records[-1]), flush=True)
        refusals = time_refusals(model, Path(tmp), args.repeats)
        noop = time_noop_launches(Path(tmp), args.repeats)
    summary = {v: {"wall_s": [r["wall_s"] for r in records if r["variant"] == v],
                   "saved_to_exit_s": [r["saved_to_exit_s"] for r in records if r["variant"] == v]}
               for v in args.variants.split(",")}
    result = {
        "what": "one 2-process launch of the seed's vLLM colocate flags (tiny Qwen2.5-VL, 2 steps, 64-token "
                "completions, 2 ZeRO-3 CPU processes under accelerate launch), per start-up variant",
        "command": " ".join([".venv/bin/python tests/time_launch.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}",
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": records,
        "summary": summary,
        "one_process_refusal": refusals,
        "noop_launch": noop,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
