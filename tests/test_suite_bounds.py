"""The suite can never hang: every test has a time limit (pytest-timeout, configured in pyproject.toml) and every
process a test starts goes through tests/_proc.py (a required timeout, the whole process tree killed).

Each guard has a control that shows it catches what it is for."""

from __future__ import annotations

import ast
import os
import sys
import time
import tomllib
from pathlib import Path

import pytest

import _proc

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# scripts that the tests run in-process and that start training runs themselves
SCRIPTS_RUN_BY_TESTS = [REPO / "scripts" / "learning_demo.py"]
STARTERS = {"run", "Popen", "call", "check_call", "check_output"}


def direct_subprocess_calls(source: str) -> list[int]:
    """Lines that start a process with the subprocess module directly (not through tests/_proc.py)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in STARTERS
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"):
            lines.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "subprocess":
            if any(alias.name in STARTERS for alias in node.names):
                lines.append(node.lineno)
    return lines


def unbounded_proc_runs(source: str) -> list[int]:
    """Lines calling `_proc.run` without a `timeout=` (a TypeError at run time too; caught here before a run)."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "_proc"
            and "timeout" not in {k.arg for k in node.keywords}]


def test_the_guard_sees_a_direct_subprocess_call():
    assert direct_subprocess_calls("import subprocess\nsubprocess.run(['true'])\n") == [2]
    assert direct_subprocess_calls("import subprocess\np = subprocess.Popen(['sleep', '1'])\n") == [2]
    assert direct_subprocess_calls("from subprocess import check_output\n") == [1]
    assert direct_subprocess_calls("import subprocess\nx = subprocess.PIPE\n") == []
    assert unbounded_proc_runs("import _proc\n_proc.run(['true'])\n") == [2]
    assert unbounded_proc_runs("import _proc\n_proc.run(['true'], timeout=5)\n") == []


def test_no_test_starts_a_process_outside_the_bounded_runner():
    offenders = [f"{path.relative_to(REPO)}:{line}"
                 for path in sorted(TESTS.glob("*.py")) if path.name != "_proc.py"
                 for line in direct_subprocess_calls(path.read_text())]
    assert not offenders, f"start processes with tests/_proc.py (run/started), not subprocess: {offenders}"
    unbounded = [f"{path.relative_to(REPO)}:{line}" for path in sorted(TESTS.glob("*.py"))
                 for line in unbounded_proc_runs(path.read_text())]
    assert not unbounded, f"_proc.run without timeout=: {unbounded}"


def test_scripts_the_tests_run_bound_their_training_run():
    for path in SCRIPTS_RUN_BY_TESTS:
        tree = ast.parse(path.read_text())
        waits = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and n.func.attr in {"wait", "communicate", "run"} and "timeout" in {k.arg for k in n.keywords}]
        assert waits, f"{path.relative_to(REPO)} waits for its training run without a timeout"


def test_every_test_has_a_time_limit():
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert float(options["timeout"]) == 1200, "per-test limit (seconds), pytest-timeout"
    assert options["timeout_method"] == "signal", "signal: a timed-out test fails alone, the session goes on"
    pin = (REPO / "code/vlm-grpo/requirements-dev.txt").read_text()
    assert "\npytest-timeout==2.4.0 " in pin


def alive_after(pid: int, seconds: float) -> bool:
    """Whether process `pid` still runs, and is no zombie, `seconds` from now (polled every 0.1 s; False as soon as it
    is gone)."""
    import psutil

    deadline = time.monotonic() + seconds
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)
    return False


def test_a_timed_out_run_leaves_no_process_behind(tmp_path):
    """A launcher whose worker sits in a session of its own (as torch elastic starts workers;
    tests/interrupt_target.py's LAUNCHER): on timeout both are gone. Control: the same tree, killed only by process
    group as `os.killpg` would, leaves the worker alive."""
    import psutil

    from interrupt_target import LAUNCHER

    pid_file = tmp_path / "worker.pid"
    launcher = [sys.executable, "-c", LAUNCHER, str(pid_file)]
    with pytest.raises(Exception, match="timed out"):
        _proc.run(launcher, timeout=5)
    worker = int(pid_file.read_text().split()[1])
    assert not alive_after(worker, 10), f"worker {worker} survived the timeout"

    # control: killing the launcher's process group alone misses the worker
    import os
    import signal
    pid_file.unlink()
    with _proc.started(launcher) as proc:
        while not pid_file.exists() or not pid_file.read_text():
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        worker = int(pid_file.read_text().split()[1])
        assert psutil.pid_exists(worker), "control: the worker outlives a process-group kill"
        psutil.Process(worker).kill()


# ---- the `make test` timing stays true --------------------------------------------------------------------------

TIMING = REPO / "experiments" / "vlm-grpo" / "cpu-results" / "make-test.json"


def selected_count(summary: str) -> int:
    """Tests pytest selected, from `--collect-only -q`'s last line: `N tests collected` or `N/M tests collected (K
    deselected)` (N is what runs)."""
    import re

    match = re.search(r"(\d+)(?:/\d+)? tests? collected", summary)
    assert match, summary
    return int(match.group(1))


def test_the_count_parser_reads_both_forms():
    assert selected_count("663/664 tests collected (1 deselected) in 21.07s") == 663
    assert selected_count("12 tests collected in 0.50s") == 12


def runs_the_whole_suite(config) -> bool:
    """This session selects what `make test` selects: the configured test paths, addopts' marker expression, no -k,
    no --deselect, no --lf."""
    option = config.option
    return (config.args_source == pytest.Config.ArgsSource.TESTPATHS and option.markexpr == "not gpu"
            and not option.keyword and not option.deselect and not getattr(option, "lf", False))


def test_the_recorded_make_test_timing_is_of_this_suite(request):
    """The README's `make test` time comes from make-test.json, measured at a commit with a test count. A test added
    or removed since then makes this fail: re-measure (the file says how) rather than quote a stale time. Under `make
    test` the count is this session's; a partial run (a path, -k) counts the suite in a `--collect-only` run."""
    import json

    record = json.loads(TIMING.read_text())
    if runs_the_whole_suite(request.config):
        current = len(request.session.items)
    else:
        proc = _proc.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        current = selected_count(proc.stdout.strip().splitlines()[-1])
    assert record["tests"] == current, (
        f"{TIMING.relative_to(REPO)} records {record['tests']} tests, the suite now has {current}: re-measure "
        f"(`{record['command']}` in a fresh clone) and update it with the README's `make test` row")


def test_what_a_fixture_writes_into_the_environment_ends_with_its_scope(request, monkeypatch):
    """conftest.restored_environment puts back changed, added and removed variables; both restores are active here:
    the test's own and the module's (module- and session-scoped fixtures are set up before the test's own saves)."""
    from conftest import restored_environment

    monkeypatch.setenv("SUITE_BOUNDS_KEPT", "before")
    monkeypatch.setenv("SUITE_BOUNDS_REMOVED", "before")
    with restored_environment():
        os.environ["SUITE_BOUNDS_KEPT"] = "after"
        os.environ["OMP_NUM_THREADS_LIKE"] = "2"  # what vLLM's in-process engine does to OMP_NUM_THREADS
        del os.environ["SUITE_BOUNDS_REMOVED"]
    assert (os.environ["SUITE_BOUNDS_KEPT"], os.environ["SUITE_BOUNDS_REMOVED"]) == ("before", "before")
    assert "OMP_NUM_THREADS_LIKE" not in os.environ
    assert {"_restore_environment", "_restore_environment_after_module"} <= set(request.fixturenames)


# ---- `make test`'s two workers: a shared run made once, the heaviest units first (tests/conftest.py) --------------


def readers(run: str) -> set[str]:
    """The test files whose code names `run` (a shared run's fixture or function): defines, imports, calls or asks
    for it as a fixture. Docstrings and comments do not count."""
    def names(source: str) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name):
                found.add(node.id)
            elif isinstance(node, ast.arg):
                found.add(node.arg)
            elif isinstance(node, (ast.alias, ast.FunctionDef)):
                found.add(node.name)
        return found

    return {p.name for p in TESTS.glob("test_*.py") if p.name != "test_suite_bounds.py" and run in names(p.read_text())}


def test_the_files_that_read_a_shared_run_go_out_as_one_unit():
    """A file that reads a session-scoped run in a unit of its own would make the run again in the other worker (2
    ZeRO-3 launches for fast_paths_runs). A new reader fails the literal table: add it to conftest.SHARED_RUNS."""
    from conftest import SHARED_RUNS, work_unit

    runs = sorted(set(SHARED_RUNS.values()))
    assert {run: readers(run) for run in runs} == {
        "base_run": {"test_faults.py", "test_resume.py", "test_resume_e2e.py"},
        "fast_paths_runs": {"test_fast_paths.py", "test_vllm_colocate.py"},
        "single_process_run": {"test_split_record.py", "test_train_cpu.py"}}
    for run in runs:
        assert {work_unit(name) for name in readers(run)} == {run}
    # control: a file the table does not name is a unit of its own
    assert work_unit("test_a_new_reader.py") == "test_a_new_reader.py"


def test_the_heaviest_first_list_names_units_that_exist():
    """A renamed or merged file would drop out of HEAVIEST_FIRST silently and go out last, in collection order."""
    from conftest import HEAVIEST_FIRST, work_unit

    units = {work_unit(p.name) for p in TESTS.glob("test_*.py")}
    assert len(set(HEAVIEST_FIRST)) == len(HEAVIEST_FIRST) == 18
    assert set(HEAVIEST_FIRST) <= units, set(HEAVIEST_FIRST) - units
    assert "test_renamed.py" not in units  # control


def test_this_sessions_tests_are_ordered_and_marked_by_unit(request):
    """In this session (a worker's, under `make test`), every test carries its unit's xdist_group mark (what
    `--dist loadgroup` sends whole to one worker), a unit's tests are adjacent, and the units HEAVIEST_FIRST names come
    first, in its order."""
    from conftest import HEAVIEST_FIRST, work_unit

    items = request.session.items
    assert all(item.get_closest_marker("xdist_group").args == (work_unit(item.path.name),) for item in items)
    order = [work_unit(item.path.name) for item in items]
    first_seen = list(dict.fromkeys(order))
    runs = [unit for i, unit in enumerate(order) if i == 0 or order[i - 1] != unit]
    assert runs == first_seen, "a unit's tests are split"
    named = [unit for unit in first_seen if unit in HEAVIEST_FIRST]
    assert named == [unit for unit in HEAVIEST_FIRST if unit in named]
    assert first_seen[:len(named)] == named, "a unit HEAVIEST_FIRST names comes after one it does not"


def test_sigterm_to_make_tests_pytest_leaves_no_process_behind(tmp_path):
    """CI's time limit sends SIGTERM to pytest, which runs the tests in 2 xdist workers: the controller unwinds
    (tests/conftest.py's handler), xdist ends its workers, and a worker's running test kills its process trees
    (tests/_proc.py), the launcher's worker in a session of its own included (tests/interrupt_target.py). Control:
    SIGKILL to pytest's process group (the controller and its xdist workers) unwinds nothing, and that worker outlives
    it. (SIGKILL to the controller alone is not a control: the workers see their channel close and unwind.)"""
    import signal

    def survivor(kill) -> bool:
        pid_file = tmp_path / f"worker-{kill.__name__}.pid"
        with _proc.started([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                            "tests/interrupt_target.py"], cwd=REPO,
                           env={**os.environ, "INTERRUPT_TARGET_PID_FILE": str(pid_file)}) as proc:
            deadline = time.monotonic() + 120
            while not pid_file.exists() or not pid_file.read_text():
                assert time.monotonic() < deadline and proc.poll() is None, "the target test did not start"
                time.sleep(0.1)
            launcher, worker = map(int, pid_file.read_text().split())
            kill(proc)
            proc.wait(timeout=60)
        if alive_after(worker, 10):
            _proc.kill_tree(launcher)
            _proc.kill_tree(worker)
            return True
        return False

    def sigterm(proc):
        proc.send_signal(signal.SIGTERM)

    def sigkill_group(proc):
        os.killpg(proc.pid, signal.SIGKILL)

    assert not survivor(sigterm), "a worker outlived SIGTERM to pytest"
    assert survivor(sigkill_group), "control: nothing unwinds after SIGKILL to the group, the worker is left"
