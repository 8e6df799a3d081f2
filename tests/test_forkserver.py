"""tests/_forkserver.py: a fork of the server ends like `python script.py` would (output, status, exit handlers), forks
only where the environment allows, and a run past its time bound is killed without taking the server with it; a forked
`accelerate launch` (its workers forks too) ends as the real one does, its server follows the launch's environment,
and a launch past its bound is killed with its workers."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap

import psutil
import pytest

import _forkserver
import _proc
from test_train_cpu import env as launch_env, launch_cmd  # the suite's launches: their command and environment

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


def test_a_declared_environment_forks_from_a_server_started_with_it(script, tmp_path):
    """test_dry_run's no-vLLM PYTHONPATH: undeclared, no server (a real process); declared (serve_env), a fork of a second server
    whose imports ran under it (vLLM hidden: TRL then never imports it), while the suite's server keeps vLLM."""
    hide = tmp_path / "no-vllm"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None\n")
    (script.parent / "probe.py").write_text("import sys\nprint('vllm:', sys.modules.get('vllm') is not None)\n")
    script.write_text("import runpy, sys\nprint('preloaded:', 'torch' in sys.modules)\n"
                      "runpy.run_path(sys.argv[0].replace('grpo_vlm.py', 'probe.py'))\n")
    env = {**os.environ, "PYTHONPATH": str(hide)}
    assert _forkserver.forker(str(script), env) is None  # undeclared: a real process
    with _forkserver.serve_env({"PYTHONPATH": str(hide)}):
        forked = [_forkserver.run(str(script), [], env=env, timeout=120, cwd=tmp_path) for _ in range(2)]
        other = _forkserver._OTHER
        assert [p.stdout.splitlines() for p in forked] == [["preloaded: True", "vllm: False"]] * 2
        assert other.env["PYTHONPATH"] == str(hide) and other is not _forkserver.server()
    assert not other.alive(), "closed at the block's end"
    suite = _forkserver.run(str(script), [], env=dict(os.environ), timeout=120, cwd=tmp_path)
    assert suite.stdout.splitlines() == ["preloaded: True", "vllm: True"]


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


# ---- `accelerate launch`: the launcher a fork of its own server, the workers real processes --------------------------

WORKER = textwrap.dedent("""\
    import os, sys, time
    import torch, trl  # as grpo_vlm.py starts: TRL imports vLLM (and IPEX) where installed
    line = (f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} argv {sys.argv[1:]} env "
            f"{os.environ.get('HF_TOKEN')} {os.environ.get('ACCELERATE_USE_DEEPSPEED')} threads {torch.get_num_threads()} "
            f"omp {os.environ.get('OMP_NUM_THREADS')} vllm_log {os.environ.get('VLLM_LOGGING_LEVEL')} "
            f"own_session {os.getsid(0) == os.getpid()}")
    os.write(1, (line + "\\n").encode())  # one write: the two ranks share the launcher's stdout
    if sys.argv[1] == "fail" and os.environ["RANK"] == "1":
        sys.exit(3)
    if sys.argv[1] == "sleep":
        time.sleep(600)
""")
# what differs between two runs of the same launch: log timestamps, process ids
VOLATILE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+|[IWE]\d{4} \d\d:\d\d:\d\d\.\d+( \d+)?")


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def worker_lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith("rank "))


def normalized(text: str) -> list[str]:
    return sorted(VOLATILE.sub("<volatile>", line) for line in text.splitlines())


def test_a_forked_launcher_ends_as_accelerate_launch_does(worker, tmp_path):
    cmd = launch_cmd(str(worker), ["ok"])
    env = {**launch_env(), "HF_TOKEN": "hf_test"}
    forked = _forkserver.launch(cmd, env=env, timeout=120, cwd=tmp_path)
    real = _proc.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert forked.returncode == real.returncode == 0
    # the workers' lines (forks of the forked launcher, or real processes: the launch's environment and accelerate's,
    # torch elastic's 1 thread each, what TRL's import sets, a session each), and what the imports print (DeepSpeed's
    # accelerator warning, the workers' import warnings: printed again by each fork)
    for rank in (0, 1):
        line = f"rank {rank} of 2 argv ['ok'] env hf_test true threads 1 omp 1 vllm_log ERROR own_session True"
        assert line in real.stdout.splitlines()
    assert worker_lines(forked.stdout) == worker_lines(real.stdout)
    # what the imports print comes first, once per process: the launcher's (DeepSpeed's accelerator warning) printed
    # again by the forked launcher. A forked worker prints its imports' output as the server's imports printed it,
    # which is not all a real worker prints: oneCCL's "My guessed rank" reads RANK while importing
    assert "Setting accelerator to CPU" in forked.stdout.splitlines()[0] and "Setting accelerator to CPU" in real.stdout
    assert "ChildFailedError" not in forked.stderr and "ChildFailedError" not in real.stderr


def test_a_forked_launcher_fails_as_accelerate_launch_does_when_a_worker_fails(worker, tmp_path):
    """What `accelerate launch` does when rank 1 exits 3 (seen on real launches): status 1, torch elastic's
    ChildFailedError naming the rank's exit code; the other rank ran."""
    forked = _forkserver.launch(launch_cmd(str(worker), ["fail"]), env=launch_env(), timeout=120, cwd=tmp_path)
    assert forked.returncode == 1
    assert "ChildFailedError" in forked.stderr and "exitcode  : 3" in forked.stderr
    assert "rank 0 of 2 argv ['fail'] env None true threads 1 omp 1 vllm_log ERROR own_session True" in forked.stdout.splitlines()


def test_the_launchers_server_is_started_again_for_another_environment(monkeypatch):
    """One launcher server at a time, started with a launch's environment but LAUNCH_RUNTIME_ENV: a launch that differs
    from it only there forks from it, any other difference starts another (servers stood in for here)."""
    started = []

    class StandIn:
        def __init__(self, env, kind):
            self.env, self.kind, self.closed = env, kind, False
            started.append(self)

        def alive(self):
            return not self.closed

        def close(self):
            self.closed = True

    monkeypatch.setattr(_forkserver, "_Server", StandIn)
    monkeypatch.setattr(_forkserver, "_LAUNCHER", None)
    env = launch_env()
    first = _forkserver.launcher_server(env)
    assert _forkserver.launcher_server({**env, "HF_TOKEN": "hf_other", "PYTEST_CURRENT_TEST": "x"}) is first
    second = _forkserver.launcher_server({**env, "TEST_ONLY_VARIABLE": "1"})
    assert second is not first and first.closed and len(started) == 2, "one launcher server at a time"
    assert second.kind == "launcher" and second.env["TEST_ONLY_VARIABLE"] == "1" and "HF_TOKEN" not in second.env
    assert second.env == {k: v for k, v in env.items() if k not in _forkserver.LAUNCH_RUNTIME_ENV} | {
        "TEST_ONLY_VARIABLE": "1"}


def test_a_launch_past_its_time_bound_is_killed_with_its_workers(worker, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        _forkserver.launch(launch_cmd(str(worker), ["sleep"]), env=launch_env(), timeout=3, cwd=tmp_path)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(worker) in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"processes of the timed-out launch are still there: {left}"
    server = _forkserver._LAUNCHER
    assert server.alive() and [p for p in server_children(server) if p.status() != psutil.STATUS_ZOMBIE] == []
