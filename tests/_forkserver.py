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
real process, unless a test declared that environment (`serve_env`): then a second server is started with it and the
runs fork from that one. tests/test_forkserver.py runs command lines both ways and compares what a user sees.

`accelerate launch` (`python -m accelerate.commands.launch`) forks the same way, from a server of its own that imported
what the launcher imports before it starts a worker: accelerate, torch's elastic launcher and DeepSpeed whole
(accelerate's deepspeed_launcher imports deepspeed.launcher.runner for one constant). A 2-process launch of a script
that does nothing took 6.1 s with the launcher a real process, 0.2 s with it a fork (means of 2, 2-core CI machine:
experiments/vlm-grpo/cpu-results/suite-speedups.json, `noop_launch`): the imports, and the interpreter's last garbage
collection of them at exit, which a fork skips (it ends with os._exit after the exit handlers). That server is
started with the launch's own environment (but the variables in LAUNCH_RUNTIME_ENV) and started again when a launch
comes with another one, so the launcher's imports always ran under the environment a real launcher would have.

The workers are forks too: that server also imported the workers' libraries (PRELOAD), and in a forked launcher
torch elastic's `python -u SCRIPT` becomes a fork of the launcher (the worker in a session of its own, with the
environment elastic gives it plus what the imports set, a fresh interpreter's signal handlers, the script run as
`__main__`). Two settings are read while importing and must match: OpenMP reads OMP_NUM_THREADS when it loads, so the
server imports under torch elastic's OMP_NUM_THREADS=1 for 2-process workers, and unbuffered output (`-u`) needs
PYTHONUNBUFFERED=1 in the server's environment. A worker with another value (a 1-process launch: elastic sets no
OMP_NUM_THREADS) is a real process. What a forked worker's imports print is the server's import output, not all of
what a real worker prints (oneCCL's "My guessed rank" reads RANK while importing).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
FORKED_SCRIPTS = {"grpo_vlm.py", "evaluate.py", "measure_data_prep.py",
                  "thread_binding_check.py"}  # the tests' own: imports vLLM's CPU worker and vllm_colocate
# read by the code when used, not at import: a run may differ from the server's environment in these and still fork
# (vllm/envs.py reads VLLM_* when asked, and tests/_vllm.py sets these two as test files are collected; inductor sets
# its cache folder's variable in the process that first compiles, the test process included, and reads it when used)
RUNTIME_ENV = {"HF_TOKEN", "FLEXAI_INPUT_CHECKPOINT_DIR", "FLEXAI_OUTPUT_CHECKPOINT_DIR", "TOKENIZERS_PARALLELISM",
               "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "TORCHINDUCTOR_CACHE_DIR",
               "PYTEST_CURRENT_TEST"}
# the server's environment: the suite's as this module is first imported (tests/conftest.py, offline flags set), so a
# test that changes os.environ for itself never becomes every later run's environment
SERVER_ENV = {k: v for k, v in os.environ.items() if k not in RUNTIME_ENV}

LAUNCHER = "accelerate.commands.launch"
# imported by `accelerate launch` with the recipe's DeepSpeed config before it starts the workers
LAUNCHER_PRELOAD = [LAUNCHER, "deepspeed.launcher.runner", "torch.distributed.run"]
# what a launch may differ in from its server's environment: read by the workers (real processes, which get the
# launch's whole environment) and never by the launcher (`datasets`, whose cache folder HF_DATASETS_CACHE names, is not
# among its imports); pytest names the running test in PYTEST_CURRENT_TEST
LAUNCH_RUNTIME_ENV = {"PYTEST_CURRENT_TEST", "HF_TOKEN", "VLM_GRPO_FAULT", "FLEXAI_INPUT_CHECKPOINT_DIR",
                      "FLEXAI_OUTPUT_CHECKPOINT_DIR", "HF_DATASETS_CACHE"}


# ---- the server (python tests/_forkserver.py) -----------------------------------------------------------------------


def _exit_code(code) -> int:
    """The status the interpreter gives `raise SystemExit(code)` (Python/pythonrun.c, handle_system_exit)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run_as_main(script: str | None, module: str | None) -> int:
    import runpy

    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)  # `python -m MODULE`
        else:
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


# what the launcher's server knows of its worker libraries (serve fills it): what importing them printed, the
# variables that importing them set, and the two import-time settings a worker's environment must match
_WORKER: dict = {}


class _ForkedWorker:
    """A worker forked by a forked launcher, with what torch elastic uses of subprocess.Popen."""

    def __init__(self, pid: int, args: tuple):
        self.pid, self.args, self.returncode = pid, args, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def worker_forks(args: tuple, env: dict) -> bool:
    """Whether torch elastic's `python -u SCRIPT ...` with `env` may be a fork of the forked launcher: the worker
    libraries imported under the same OMP_NUM_THREADS (OpenMP reads it once, when it loads) and unbuffered output
    (`-u`) as the worker would have. The rest of the launcher server's environment is the launch's by construction."""
    return (bool(_WORKER) and len(args) >= 3 and args[0] == sys.executable and args[1] == "-u"
            and args[2].endswith(".py") and env.get("OMP_NUM_THREADS") == _WORKER["omp"]
            and env.get("PYTHONUNBUFFERED") == _WORKER["unbuffered"] == "1")


def _worker_child(args: tuple, env: dict, stdout, stderr) -> None:
    def setup():
        os.setsid()  # torch elastic starts each worker in a session of its own
        if stdout is not None:
            os.dup2(stdout.fileno(), 1)
        if stderr is not None:
            os.dup2(stderr.fileno(), 2)
        os.write(1, _WORKER["printed"][0])
        os.write(2, _WORKER["printed"][1])
        # a fresh interpreter's signal handling, not the launcher's (torch elastic handles SIGTERM/SIGINT/...)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    # what the imports set, as a real worker's would
    _run_and_exit(setup, {**_WORKER["imported_env"], **env}, args[2], None, list(args[3:]))


def _fork_workers() -> None:
    """In a forked launcher: torch elastic forks each worker from it (the worker libraries imported already) where
    `worker_forks` allows, and starts a real `python -u SCRIPT` otherwise."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    real_popen = subprocess_handler.SubprocessHandler._popen

    def _popen(self, args, env):
        if not worker_forks(args, env):
            return real_popen(self, args, env)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _worker_child(args, env, self._stdout, self._stderr)
        return _ForkedWorker(pid, args)

    subprocess_handler.SubprocessHandler._popen = _popen


def _run_and_exit(setup, env: dict, script: str | None, module: str | None, args: list[str]) -> None:
    """In a fork: `setup()`, then the script or module as `__main__` with `env` and `args`, as `python SCRIPT ARGS` or
    `python -m MODULE ARGS` would run it; the process ends with its status (os._exit: the server's exit handlers and
    buffers are not the child's)."""
    code = 1
    try:
        setup()
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [script or "-m", *args]
        # `python script.py` puts the script's folder first on sys.path, `python -m` the working directory
        sys.path[0] = os.path.dirname(os.path.abspath(script)) if script else os.getcwd()
        if module == LAUNCHER and _WORKER:
            _fork_workers()
        code = _run_as_main(script, module)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _child(request: dict, protocol_fds: tuple[int, ...], printed: list[bytes]) -> None:
    def setup():
        os.setsid()
        for fd in protocol_fds:
            os.close(fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        if request["stderr"] == request["stdout"]:  # one file for both, as Popen's stderr=STDOUT
            os.dup2(1, 2)
        else:
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        os.write(1, printed[0])
        os.write(2, printed[1])
        os.chdir(request["cwd"])

    _run_and_exit(setup, request["env"], request.get("script"), request.get("module"), request["args"])


def _import_capturing(names: list[str]) -> list[bytes]:
    """Import `names` (those installed); what they printed on stdout and on stderr."""
    import importlib

    printed = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    os.dup2(printed[0].fileno(), 1)  # what the libraries print while importing does not go into the replies
    os.dup2(printed[1].fileno(), 2)
    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    for stream in printed:
        stream.seek(0)
    return [stream.read() for stream in printed]


def serve(preload: list[str], replay: bool, worker_preload: list[str] = ()) -> None:
    """Import `preload`, then fork a child per request line. With `replay`, what the imports printed is printed again
    by each child first, as the real process prints it on its way (the launcher: DeepSpeed's accelerator warning).
    `worker_preload` (the launcher's server): imported after, for the workers a forked launcher forks in turn."""
    import gc

    protocol_in, protocol_out = 0, os.dup(1)
    printed = _import_capturing(preload)
    request_prefix = printed if replay else [b"", b""]
    if worker_preload:
        before = dict(os.environ)
        _WORKER.update(printed=_import_capturing(worker_preload), omp=os.environ.get("OMP_NUM_THREADS"),
                       unbuffered=os.environ.get("PYTHONUNBUFFERED"),
                       imported_env={k: v for k, v in os.environ.items() if before.get(k) != v})
    gc.freeze()  # the children never scan the preloaded objects
    reply = os.fdopen(protocol_out, "w", buffering=1)
    reply.write(json.dumps({"ready": dict(os.environ)}) + "\n")  # with what the imports set (trl, vllm do)
    for line in sys.stdin:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(json.loads(line), (protocol_in, protocol_out), request_prefix)
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


# ---- the client (the tests) -----------------------------------------------------------------------------------------


class _Server:
    def __init__(self, env: dict, kind: str = "scripts"):
        self.env = env
        self._buffer = b""
        # killed with its children (a run under way) when the test session's interpreter exits
        self._held = contextlib.ExitStack()
        if kind == "launcher":  # the worker libraries load under what torch elastic gives 2-process workers
            env = {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
        self.proc = self._held.enter_context(_proc.started(
            [_proc.PYTHON, __file__, kind], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, bufsize=0))
        atexit.register(self._held.close)
        self.imported_env = json.loads(self.read(300))["ready"]

    def close(self) -> None:
        self._held.close()

    def read(self, timeout: float) -> str:
        """The server's next reply line, waiting `timeout` seconds at most (0: only if it is there already)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the fork server died")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    def request(self, request: dict) -> int:
        """Start a fork for `request`; its pid."""
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        return json.loads(self.read(60))["pid"]

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


# environments a test declared (serve_env) that differ from the server's in variables read at import, and the one
# server at a time that was started with such an environment
_DECLARED: list[dict] = []
_OTHER: _Server | None = None


@contextlib.contextmanager
def serve_env(overrides: dict):
    """Within the block, a listed script whose environment holds `overrides` (variables read at import, such as
    test_dry_run's PYTHONPATH that hides vLLM) forks from a server started with that run's environment (but
    RUNTIME_ENV), started on first use and again for another environment; closed at the block's end. For tests that
    run several times under one such environment: outside a declared one, it gets a real process."""
    _DECLARED.append(dict(overrides))
    try:
        yield
    finally:
        _DECLARED.remove(overrides)
        if _OTHER is not None:
            _OTHER.close()


def other_server(env: dict) -> _Server:
    global _OTHER
    wanted = {k: v for k, v in env.items() if k not in RUNTIME_ENV}
    if _OTHER is None or not _OTHER.alive() or _OTHER.env != wanted:
        if _OTHER is not None:
            _OTHER.close()
        _OTHER = _Server(wanted)
    return _OTHER


def forker(script: str, env: dict) -> _Server | None:
    """The server `python SCRIPT` with `env` forks from: the suite's where `forks` allows, a declared environment's
    (serve_env), or None (a real process)."""
    if forks(script, env):
        return server()
    if Path(script).name in FORKED_SCRIPTS and any(all(env.get(k) == v for k, v in overrides.items())
                                                   for overrides in _DECLARED):
        return other_server(env)
    return None


def run(script: str, args, *, env: dict, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` with stdout and stderr captured as text: a fork of a server where `forker` names one, a
    real process otherwise. On timeout (or an interrupted test) the run's whole process tree is killed."""
    cmd = [_proc.PYTHON, script, *map(str, args)]
    chosen = forker(script, env)
    if chosen is None:
        return _proc.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return _fork(chosen, {"script": script, "args": cmd[2:]}, cmd, env, timeout, cwd)


_LAUNCHER: _Server | None = None


def launcher_server(env: dict) -> _Server:
    """The launcher's fork server, started with `env` but LAUNCH_RUNTIME_ENV (about 6 s), or started again if the one
    running was started with another environment or died."""
    global _LAUNCHER
    wanted = {k: v for k, v in env.items() if k not in LAUNCH_RUNTIME_ENV}
    if _LAUNCHER is None or not _LAUNCHER.alive() or _LAUNCHER.env != wanted:
        if _LAUNCHER is not None:
            _LAUNCHER.close()
        _LAUNCHER = _Server(wanted, kind="launcher")
    return _LAUNCHER


def is_launch(cmd: list) -> bool:
    """Whether `cmd` is `accelerate launch ...` by the venv's interpreter (as test_train_cpu.launch_cmd writes it)."""
    return list(cmd[:3]) == [_proc.PYTHON, "-m", LAUNCHER]


def _launcher_args(cmd: list) -> list[str]:
    if not is_launch(cmd):
        raise ValueError(f"not an accelerate launch by {_proc.PYTHON}: {cmd[:3]}")
    return list(map(str, cmd[3:]))


def launch(cmd: list[str], *, env: dict, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`accelerate launch ...` (cmd: [python, -m, accelerate.commands.launch, ...]) with stdout and stderr captured as
    text, the launcher a fork of the launcher's server. On timeout (or an interrupted test) the launcher and its
    workers are killed."""
    args = _launcher_args(cmd)
    return _fork(launcher_server(env), {"module": LAUNCHER, "args": args}, [*cmd[:3], *args], env, timeout, cwd)


class ForkedLaunch:
    """A forked launcher in the background, with what tests use of subprocess.Popen: pid, poll, wait, send_signal."""

    def __init__(self, forker: _Server, pid: int, cmd: list[str]):
        self.forker, self.pid, self.args, self.returncode = forker, pid, cmd, None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(TimeoutError):
                self.returncode = json.loads(self.forker.read(0))["returncode"]
        return self.returncode

    def wait(self, timeout: float) -> int:
        if self.returncode is None:
            try:
                self.returncode = json.loads(self.forker.read(timeout))["returncode"]
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)


@contextlib.contextmanager
def started_launch(cmd: list[str], *, env: dict, log: Path, cwd: Path = REPO):
    """`accelerate launch ...` for a `with` block, stdout and stderr both to `log`, the launcher a fork of the
    launcher's server: the test signals or waits on the ForkedLaunch it gets. The launcher and its workers are killed
    when the block ends, however it ends."""
    args = _launcher_args(cmd)
    forker = launcher_server(env)
    log.write_bytes(b"")  # there from the start, for a test that reads it while the run goes on
    pid = forker.request({"module": LAUNCHER, "args": args, "env": env, "cwd": str(cwd), "stdout": str(log),
                          "stderr": str(log)})
    launch = ForkedLaunch(forker, pid, cmd)
    try:
        yield launch
    finally:
        if launch.poll() is None:
            _proc.kill_tree(pid)
            with contextlib.suppress(Exception):
                launch.wait(30)


def _fork(forker: _Server, what: dict, cmd: list[str], env: dict, timeout: float,
          cwd: Path) -> subprocess.CompletedProcess:
    """Run `what` (a script or a module, and its args) as a fork of `forker` to its end; `cmd` names it to the caller."""
    with tempfile.TemporaryDirectory(prefix="forkserver-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        pid = forker.request({**what, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)})
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
    launcher = sys.argv[1:] == ["launcher"]
    serve(LAUNCHER_PRELOAD if launcher else PRELOAD, replay=launcher, worker_preload=PRELOAD if launcher else ())
