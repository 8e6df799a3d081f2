"""Every process a test starts goes through here: a time bound is required, and when it runs out (or the test is
interrupted: pytest-timeout, Ctrl-C, a failed assertion in a `started` block) the process *and all its descendants*
are SIGKILLed.

Why not `subprocess.run(timeout=...)`: on timeout it kills only the child it started. `accelerate launch` and
`torchrun` are launchers; torch elastic starts each worker in a session of its own
(torch/distributed/elastic/multiprocessing/subprocess_handler/subprocess_handler.py: `start_new_session=True`), so
neither the launcher's death nor a kill of its process group reaches the workers, which would keep two cores busy
for the rest of CI. The tree is read with psutil before anything is killed, so reparented workers are included.

tests/test_suite_bounds.py fails if a test file calls `subprocess` directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

# the interpreter the tests' processes run: the repository's venv (the one make test sets up), else pytest's own
_VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
PYTHON = str(_VENV_PYTHON) if _VENV_PYTHON.exists() else sys.executable


def kill_tree(pid: int) -> None:
    """SIGKILL a process, every descendant of it and its process group; wait for them to be gone (30 s at most)."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root]
    with contextlib.suppress(psutil.NoSuchProcess):
        procs += root.children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # the child leads its own group (start_new_session): stragglers in it
    psutil.wait_procs(procs, timeout=30)


def run(cmd, *, timeout: float, input=None, capture_output: bool = False, check: bool = False,
        **popen_kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` with a required `timeout` and a whole-tree kill when it expires or the caller is
    interrupted. Same keyword arguments as `subprocess.run` (cwd, env, text, stdout/stderr, preexec_fn, ...)."""
    if capture_output:
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        popen_kwargs.setdefault("stdin", subprocess.PIPE)
    popen_kwargs.setdefault("start_new_session", True)
    with subprocess.Popen(cmd, **popen_kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except BaseException:
            kill_tree(proc.pid)
            raise
        code = proc.poll()
    done = subprocess.CompletedProcess(proc.args, code, stdout, stderr)
    if check:
        done.check_returncode()
    return done


@contextlib.contextmanager
def started(cmd, **popen_kwargs):
    """A background process for a `with` block (a server, a run the test signals or kills): its whole tree is
    SIGKILLed when the block ends, however it ends. Wait on it inside the block with `proc.wait(timeout=...)`."""
    popen_kwargs.setdefault("start_new_session", True)
    proc = subprocess.Popen(cmd, **popen_kwargs)
    try:
        yield proc
    finally:
        kill_tree(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
