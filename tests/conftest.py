"""Shared fixtures: the recipe's modules on sys.path, a tiny offline Qwen2.5-VL, and a script runner.

Fixture names are part of the suite's contract (other test files use them): `repo_root`, `tiny_model`, `family_model`,
`processor`, `run_script`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO_ROOT / "code" / "vlm-grpo"
SCRIPT = RECIPE_DIR / "grpo_vlm.py"

# grpo_vlm.py imports its siblings (data, rewards, zero3, ...) as top-level modules; so do the tests.
for _path in (RECIPE_DIR, REPO_ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# Nothing in the unit tests may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# torch.compile on CPU: the CPU build of vLLM compiles its model and its sampler (vllm/v1/sample/ops/
# topk_topp_sampler.py, forward_cpu) in every engine, so every engine the suite starts pays inductor's start-up.
# Its vector-ISA probe builds a test library per ISA and loads each in a fresh interpreter that imports torch
# (torch/_inductor/cpu_vec_isa.py, check_build), even with the compile cache warm; without it the ISA is still
# chosen from the CPU's flags (avx512 amx_tile here, with the probe or without). Its compile-worker pool starts more
# interpreters on 2 cores (vllm/env_override.py sets 1 thread where vLLM is imported; the launcher does not).
# One 2-process launch of the seed's vLLM flags: 27.8 s without these, 23.0 s with them (means of 2:
# tests/time_launch.py, experiments/vlm-grpo/cpu-results/suite-speedups.json).
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# In `make test`'s 2 workers (tests run side by side, xdist sets PYTEST_XDIST_WORKER before this file loads), OpenMP
# threads wait passively: a 2-thread torch process (a tiny model's build, a 1-process run) spins a thread waiting for
# its partner while the other worker's processes hold the cores. 30 steps of box-answer warm-up next to 2 busy
# processes: 107.3 s spinning, 50.1 s passive, the same bytes (25.7 s alone; passive alone 33.4 s, hence only in
# workers); OMP_NUM_THREADS=1 took 41.7 s but gives other weights
# (experiments/vlm-grpo/cpu-results/make-test-workers.json, `openmp_wait`).
# Set here, before this process or any it starts loads OpenMP (its runtime reads the variable once, when loaded).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _proc  # noqa: E402  (the venv's interpreter, for PATH below)

# The venv's bin first on PATH, as an activated venv has it, for every process the tests start. The workers of a
# 2-process CPU launch JIT-build DeepSpeed's CPU shared-memory op with torch's cpp_extension, which runs the first
# `ninja` on PATH: `make dry-run` puts the venv's first (the `ninja` wheel, 1.13), a bare launch found the system's
# (1.11 on the CI machine), and the two hash the commands in the build folder's .ninja_log differently, so each switch
# between them rebuilt the op, 18-20 s each (its build log: experiments/vlm-grpo/cpu-results/shm-op-rebuilds.txt).
os.environ["PATH"] = os.pathsep.join([str(Path(_proc.PYTHON).parent), os.environ.get("PATH", "")])

import _forkserver  # noqa: E402  (after the environment above: it is the fork server's)


def pytest_configure(config):
    """SIGTERM to pytest (a CI runner's time limit, `kill`) unwinds like Ctrl-C instead of ending the interpreter on the
    spot: tests/_proc.py then kills the process trees the running test started (torch elastic's workers sit in
    sessions of their own and would outlive pytest).

    Under `make test` the tests run in xdist workers, so the controller passes the signal on to them first: left to
    xdist, a worker is asked to stop, interrupts itself after 5 s (execnet's _terminate_execution) and is SIGKILLed
    10 s after the request (xdist's EXIT_TIMEOUT), and a worker slowed by a busy machine was killed before its test
    unwound (a fresh-clone `make test` at 3aaab6a: test_suite_bounds' SIGTERM check found the worker alive)."""
    import signal

    import psutil

    distributing = getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")

    def _interrupt(signum, frame):
        if distributing:
            for worker in psutil.Process().children():
                with contextlib.suppress(psutil.Error):
                    worker.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)


# `make test` runs the suite in 2 pytest-xdist workers (`--dist loadgroup`). On the 2-core CI machine a 1-worker run
# left nearly a third of the CPU idle (vmstat every 10 s: 31 % idle on average;
# experiments/vlm-grpo/cpu-results/make-test-workers.json, `one_worker`) in its single-threaded stretches: one-process
# tests, interpreter start-ups, vLLM engine builds. A file is one unit of work, sent whole to one worker, so a
# module-scoped run is made once; files that read one session-scoped run are one unit (SHARED_RUNS), so that run is
# made once too. Units go out heaviest first (HEAVIEST_FIRST), the rest in collection order: a heavy file sent last
# would run alone at the end.
SHARED_RUNS = {"test_faults.py": "base_run", "test_resume.py": "base_run", "test_resume_e2e.py": "base_run",
               "test_fast_paths.py": "fast_paths_runs", "test_vllm_colocate.py": "fast_paths_runs",
               "test_train_cpu.py": "single_process_run", "test_split_record.py": "single_process_run"}
# heaviest first: each unit's seconds in a 1-worker run (experiments/vlm-grpo/cpu-results/make-test-workers.json,
# `one_worker.seconds_per_unit`)
HEAVIEST_FIRST = ("test_box_learning.py", "base_run", "test_walkthrough.py", "test_bench.py", "test_learning.py",
                  "test_serve.py", "fast_paths_runs", "test_multinode.py", "test_dry_run.py", "test_graceful_stop.py",
                  "test_forkserver.py", "test_own_task.py", "test_vllm_families.py", "test_smoke.py",
                  "test_bad_paths.py", "test_zero3_gradients.py", "test_makefile.py", "single_process_run")


def work_unit(file_name: str) -> str:
    """The unit of work a test file's tests go out in: its shared run's, or the file's own."""
    return SHARED_RUNS.get(file_name, file_name)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the mark into the unit's name
def pytest_collection_modifyitems(config, items):
    rank = {unit: i for i, unit in enumerate(HEAVIEST_FIRST)}
    # a stable sort: a unit's tests keep their order, and so do the units the list does not name
    items.sort(key=lambda item: rank.get(work_unit(item.path.name), len(rank)))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(work_unit(item.path.name)))


@contextlib.contextmanager
def restored_environment():
    """os.environ as it was before the block, whatever the block wrote into it."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test leaves os.environ as it found it. Parsing arguments in-process writes into it (transformers'
    TrainingArguments sets ACCELERATE_USE_DEEPSPEED=true for `--deepspeed`, ACCELERATE_MIXED_PRECISION always), and
    every later subprocess would inherit that: a single-process run then asks DeepSpeed for MPI (mpi4py)."""
    with restored_environment():
        yield


@pytest.fixture(scope="module", autouse=True)
def _restore_environment_after_module():
    """The same for module- and session-scoped fixtures, which are set up before a test's own restore saves the
    environment: their writes end with the module. test_learning's vLLM demo evaluates in this process, and vLLM's
    in-process engine sets OMP_NUM_THREADS=2, VLLM_WORKER_MULTIPROC_METHOD and more. Every later launch inherited
    them: torch elastic sets OMP_NUM_THREADS=1 for its workers only where it is unset, so each of the 2 workers ran 2
    threads on the 2-core machine, and no later run could fork (tests/_forkserver.py: its environment differed)."""
    with restored_environment():
        yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder of a random-weights tiny Qwen2.5-VL (model, tokenizer, processor), built offline once per session."""
    from make_tiny_model import build

    return build(tmp_path_factory.mktemp("tiny-model") / "tiny-qwen2.5-vl", preset="tiny")


@pytest.fixture(scope="session")
def family_model(tiny_model, tmp_path_factory):
    """family_model(family) -> folder of a random-weights tiny model of that family (`qwen2-vl`, `qwen2.5-vl`,
    `qwen3-vl`: make_tiny_model.py --family), built on first use, once per session; `qwen2.5-vl` is `tiny_model`."""
    from make_tiny_model import build

    built = {"qwen2.5-vl": tiny_model}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build(tmp_path_factory.mktemp(f"tiny-{family}") / f"tiny-{family}", preset="tiny",
                                  family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def processor(tiny_model):
    """The tiny model's processor, loaded the way grpo_vlm.load_processor loads it (left padding)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model, padding_side="left", truncation_side="left")


@pytest.fixture(scope="session")
def run_script():
    """run_script(args, env=None, timeout=300) -> CompletedProcess of `python code/vlm-grpo/grpo_vlm.py ARGS`.

    Runs offline (HF_HUB_OFFLINE=1) from the repository root; `env` entries are added to (and override) a copy of
    the current environment; a value of None removes that variable. A fork of tests/_forkserver.py's server where the
    environment allows it (the libraries imported once), a real process otherwise.
    """

    def _run(args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = dict(os.environ)
        full_env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = str(value)
        return _forkserver.run(str(SCRIPT), args, env=full_env, timeout=timeout, cwd=REPO_ROOT)

    return _run


@pytest.fixture(scope="session")
def single_process_run(tiny_model, tmp_path_factory):
    """(output dir, CompletedProcess) of one process training 2 steps of the offline seed flags + test_train_cpu.FAST
    on 64 synthetic rows with a quarter held out; shared by test_train_cpu.py and test_split_record.py (which copies
    it before changing anything). A fork of tests/_forkserver.py's server: `python grpo_vlm.py` without the imports."""
    from test_train_cpu import FAST, env, seed_script_args

    out = tmp_path_factory.mktemp("single-process") / "run"
    proc = _forkserver.run(str(SCRIPT), [*seed_script_args(tiny_model, out, 2), *FAST, "--synthetic_rows", "64",
                                         "--eval_fraction", "0.25"], env=env(), timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, proc


@pytest.fixture(scope="session")
def fast_paths_runs(tiny_model, tmp_path_factory):
    """tests/test_fast_paths.py as the worker of two 2-process runs of the seed's vLLM flags, 3 steps each, identical
    but for `--no_vllm_fast_paths` ("trl") and the default ("fast"); per rank: the fast-path counters, TRL's logged
    metrics, the sync check and, for the fast run, zero3_weight_check's weight report. Read by test_fast_paths.py and
    test_vllm_colocate.py (its weight checks were a third launch of the same flags before)."""
    import json
    import time

    from _vllm import require_vllm
    from test_fast_paths import ARGS, STEPS
    from test_train_cpu import launch_cmd, run
    from test_vllm_colocate import vllm_seed_args

    require_vllm()
    out = {}
    for name, extra in (("trl", ["--no_vllm_fast_paths"]), ("fast", [])):
        tmp = tmp_path_factory.mktemp(f"fast-paths-{name}")
        t0 = time.time()
        run(launch_cmd("tests/test_fast_paths.py", [tmp / "report.json", *vllm_seed_args(tiny_model, tmp / "run", STEPS),
                                                    *ARGS, *extra]))
        out[name] = {r: json.loads((tmp / f"report.json.rank{r}").read_text()) for r in (0, 1)}
        out[name]["wall_s"] = time.time() - t0
    return out
