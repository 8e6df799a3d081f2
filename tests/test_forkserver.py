"""tests/_forkserver.py: a fork of the server ends like `python script.py` would (output, status, exit handlers), forks
only where the environment allows, and a run past its time bound is killed without taking the server with it."""

from __future__ import annotations

import os
import subprocess
import textwrap

import psutil
import pytest

import _forkserver
import _proc

# named like a script that forks; prints what a user's script could see of the difference
SCRIPT = textwrap.dedent("""\
    import atexit, os, sys, threading, time
    print("preloaded:", "torch" in sys.modules, flush=True)
    print("argv:", sys.argv[1:], "cwd:", os.getcwd(), "path0:", sys.path[0], "name:", __name__)
    print("env:", os.environ.get("HF_TOKEN"), os.environ.get("TEST_ONLY_VARIABLE"))
    atexit.register(lambda: print("atexit ran", flush=True))
    def late():
        time.sleep(0.3)
        print("thread done", flush=True)
    threading.Thread(target=late).start()
    mode = sys.argv[1]
    if mode == "raise":
        raise ValueError("boom")
    if mode == "exit3":
        sys.exit(3)
    if mode == "message":
        sys.exit("error: one line")
    if mode == "sleep":
        time.sleep(600)
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "bin" / "grpo_vlm.py"
    path.parent.mkdir()
    path.write_text(SCRIPT)
    return path


def both(script, mode, tmp_path, env=None):
    env = {**os.environ, **(env or {})}
    forked = _forkserver.run(str(script), [mode], env=env, timeout=120, cwd=tmp_path)
    real = _proc.run([_proc.PYTHON, str(script), mode], cwd=tmp_path, env=env, capture_output=True, text=True,
                     timeout=120)
    return forked, real


@pytest.mark.parametrize("mode, status, last_err", [
    ("ok", 0, None),
    ("exit3", 3, None),
    ("message", 1, "error: one line"),
    ("raise", 1, "ValueError: boom"),
])
def test_a_fork_ends_as_the_script_run_by_python_does(script, tmp_path, mode, status, last_err):
    forked, real = both(script, mode, tmp_path, env={"HF_TOKEN": "hf_test"})
    assert forked.returncode == real.returncode == status
    # what the script printed, its exit handlers and its threads' output: the same, but for what was imported first
    assert forked.stdout.replace("preloaded: True", "preloaded: False") == real.stdout
    assert "preloaded: True" in forked.stdout, "the fork runs in the server, with the libraries already imported"
    lines = real.stdout.splitlines()
    assert lines[1] == f"argv: ['{mode}'] cwd: {tmp_path} path0: {script.parent} name: __main__"
    assert lines[2] == "env: hf_test None"
    assert lines[-2:] == ["thread done", "atexit ran"]
    if last_err is None:
        assert forked.stderr == real.stderr == ""
    else:
        assert forked.stderr.splitlines()[-1] == real.stderr.splitlines()[-1] == last_err
        assert ("Traceback" in forked.stderr) == ("Traceback" in real.stderr) == (mode == "raise")


def test_an_environment_the_server_was_not_started_with_gets_a_real_process(script, tmp_path):
    """A variable read at import (here one the server never saw) cannot reach the preloaded libraries: no fork."""
    env = {**_forkserver.SERVER_ENV, "TEST_ONLY_VARIABLE": "1"}
    assert not _forkserver.forks(str(script), env)
    assert _forkserver.forks(str(script), {**_forkserver.SERVER_ENV, "HF_TOKEN": "hf_other"}), "read when used"
    assert not _forkserver.forks(str(tmp_path / "merge_lora.py"), dict(_forkserver.SERVER_ENV)), "listed scripts only"
    # what TRL's import sets when unset (trl/_compat.py) is what a real process would have too; another value is not
    assert _forkserver.server().imported_env["VLLM_LOGGING_LEVEL"] == "ERROR"
    assert _forkserver.forks(str(script), {**_forkserver.SERVER_ENV, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert not _forkserver.forks(str(script), {**_forkserver.SERVER_ENV, "VLLM_LOGGING_LEVEL": "DEBUG"})
    proc = _forkserver.run(str(script), ["ok"], env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.splitlines()[:1] == ["preloaded: False"]
    assert "env: None 1" in proc.stdout


def test_a_run_past_its_time_bound_is_killed_and_the_server_serves_on(script, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        _forkserver.run(str(script), ["sleep"], env=dict(os.environ), timeout=3, cwd=tmp_path)
    server = _forkserver.server()
    assert server is _forkserver._SERVER and server.alive(), "the same server, not a new one"
    left = [p for p in server_children(server) if p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"the timed-out run is still there: {left}"
    proc = _forkserver.run(str(script), ["ok"], env=dict(os.environ), timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "atexit ran" in proc.stdout


def server_children(server) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children(recursive=True)
