"""One-process command lines without paying the library imports each time.

Most of the suite's one-process runs are a script refusing bad input or printing a plan (`grpo_vlm.py --dry_run`, a
mistyped path, `--help`). Each one paid about 7 s of importing torch, transformers, TRL, DeepSpeed and vLLM (TRL imports
vLLM wherever it is installed) for a second of its own work. Here those libraries are imported once, in a server
process of their own, and each run is a fork of that server: the child runs the script file as `__main__` the way
`python script.py` does (runpy.run_path, the script's folder first on sys.path) with its own argv, environment, working
directory, stdin from /dev/null and stdout/stderr to files, in a session of its own, and ends with the status `python
script.py` ends with (SystemExit's code; its message on stderr and 1; 1 after an uncaught traceback; non-daemon threads
and atexit handlers run first). The recipe's own modules are imported in the child, from the files as they are.

What a fork cannot redo is what the libraries read from the environment while being imported: the server keeps the
environment it started with. `run` forks only when the run's environment differs from the server's in RUNTIME_ENV
alone (variables the code reads when it uses them); any other difference (a PYTHONPATH that hides vLLM, ...) gets a
real process. tests/test_forkserver.py runs command lines both ways and compares what a user sees.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import _proc

REPO = Path(__file__).resolve().parents[1]

# imported once by the server: what `import grpo_vlm` spends its 7 s on (vllm where it is installed)
PRELOAD = ["torch", "transformers", "datasets", "peft", "accelerate", "deepspeed", "trl", "vllm", "PIL.Image",
           "safetensors.torch", "transformers.models.qwen2_vl", "transformers.models.qwen2_5_vl",
           "transformers.models.qwen3_vl"]
# the scripts that fork: each imports grpo_vlm.py (so TRL, and vLLM where installed) itself, so a fork of the server
# holds nothing those scripts would not have imported (IPEX's root-logger handler included); other scripts run as
# real processes
FORKED_SCRIPTS = {"grpo_vlm.py", "evaluate.py", "measure_data_prep.py"}
# read by the code when used, not at import: a run may differ from the server's environment in these and still fork
# (vllm/envs.py reads VLLM_* when asked, and tests/_vllm.py sets these two as test files are collected; inductor sets
# its cache folder's variable in the process that first compiles, the test process included, and reads it when used)
RUNTIME_ENV = {"HF_TOKEN", "FLEXAI_INPUT_CHECKPOINT_DIR", "FLEXAI_OUTPUT_CHECKPOINT_DIR", "TOKENIZERS_PARALLELISM",
               "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "TORCHINDUCTOR_CACHE_DIR",
               "PYTEST_CURRENT_TEST"}
# the server's environment: the suite's as this module is first imported (tests/conftest.py, offline flags set), so a
# test that changes os.environ for itself never becomes every later run's environment
SERVER_ENV = {k: v for k, v in os.environ.items() if k not in RUNTIME_ENV}


# ---- the server (python tests/_forkserver.py) -----------------------------------------------------------------------


def _exit_code(code) -> int:
    """The status the interpreter gives `raise SystemExit(code)` (Python/pythonrun.c, handle_system_exit)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run_as_main(script: str) -> int:
    import runpy

    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException:  # noqa: BLE001  (an uncaught exception: the traceback, then status 1)
        sys.excepthook(*sys.exc_info())
        code = 1
    if hasattr(threading, "_shutdown"):
        threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads
    atexit._run_exitfuncs()
    return code


def _child(request: dict, protocol_fds: tuple[int, ...]) -> None:
    code = 1
    try:
        os.setsid()
        for fd in protocol_fds:
            os.close(fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request["script"]
        sys.argv = [script, *request["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        code = _run_as_main(script)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import gc
    import importlib

    protocol_in, protocol_out = 0, os.dup(1)
    os.dup2(2, 1)  # what the libraries print while importing goes to stderr, not into the replies
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    gc.freeze()  # the children never scan the preloaded objects
    reply = os.fdopen(protocol_out, "w", buffering=1)
    reply.write(json.dumps({"ready": dict(os.environ)}) + "\n")  # with what the imports set (trl, vllm do)
    for line in sys.stdin:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(json.loads(line), (protocol_in, protocol_out))
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


# ---- the client (the tests) -----------------------------------------------------------------------------------------


class _Server:
    def __init__(self, env: dict):
        # killed with its children (a run under way) when the test session's interpreter exits
        self._held = contextlib.ExitStack()
        self.proc = self._held.enter_context(_proc.started(
            [_proc.PYTHON, __file__], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, bufsize=0))
        atexit.register(self._held.close)
        self.imported_env = json.loads(self.read(300))["ready"]

    def read(self, timeout: float) -> str:
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                raise TimeoutError
            chunk = self.proc.stdout.read(1)
            if not chunk:
                raise RuntimeError("the fork server died")
            line += chunk
        return line.decode().strip()

    def alive(self) -> bool:
        return self.proc.poll() is None


_SERVER: _Server | None = None


def server() -> _Server:
    """The fork server, started on first use (about 7 s: the imports) and restarted if it died."""
    global _SERVER
    if _SERVER is None or not _SERVER.alive():
        _SERVER = _Server(SERVER_ENV)
    return _SERVER


def forks(script: str, env: dict) -> bool:
    """Whether `python SCRIPT` with `env` may be a fork of the server: a listed script, and an environment equal to the
    server's but in RUNTIME_ENV. A variable the imports set themselves (trl/_compat.py: VLLM_LOGGING_LEVEL if unset;
    vllm/env_override.py: PYTORCH_NVML_BASED_CUDA_CHECK) may also hold the value they set: the test process has it
    once it imports the recipe, and a real process would end up with the same value."""
    if Path(script).name not in FORKED_SCRIPTS:
        return False
    imported_env = server().imported_env
    keys = set(env) | set(SERVER_ENV)
    return all(env.get(k) in (SERVER_ENV.get(k), imported_env.get(k)) for k in keys - RUNTIME_ENV)


def run(script: str, args, *, env: dict, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` with stdout and stderr captured as text: a fork of the server where `forks` allows it, a
    real process otherwise. On timeout (or an interrupted test) the run's whole process tree is killed."""
    cmd = [_proc.PYTHON, script, *map(str, args)]
    if not forks(script, env):
        return _proc.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    forker = server()
    with tempfile.TemporaryDirectory(prefix="forkserver-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        request = {"script": script, "args": cmd[2:], "env": env, "cwd": str(cwd), "stdout": str(out),
                   "stderr": str(err)}
        forker.proc.stdin.write((json.dumps(request) + "\n").encode())
        pid = json.loads(forker.read(60))["pid"]
        try:
            returncode = json.loads(forker.read(timeout))["returncode"]
        except BaseException as stop:
            _proc.kill_tree(pid)
            with contextlib.suppress(Exception):
                forker.read(30)  # the server reports the killed child: drop that line
            if isinstance(stop, TimeoutError):
                raise subprocess.TimeoutExpired(cmd, timeout) from None
            raise
        return subprocess.CompletedProcess(cmd, returncode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


if __name__ == "__main__":
    serve()
