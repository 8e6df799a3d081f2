"""vLLM on CPU machines (scripts/build_vllm_cpu.py, `make vllm-cpu`) and the FlexAI runtime's install step.

- the CPU-only view of torch's CMake config is what lets CMake find torch without CUDA, and building it leaves the
  installed torch untouched;
- a built wheel is reused (a second set-up does not rebuild);
- code/vlm-grpo/requirements.txt, which FlexAI installs on top of the runtime, resolves next to vllm==0.11.0 and
  torch==2.8.0 without changing them (uv's resolver on package metadata, no install).
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)

from _tiny import REPO

import build_vllm_cpu

CMAKE_PROJECT = """cmake_minimum_required(VERSION 3.18)
project(find_torch CXX)
find_package(Torch REQUIRED)
message(STATUS "TORCH_LIBRARIES=${TORCH_LIBRARIES}")
"""


def torch_dir() -> Path:
    import torch

    return Path(torch.__file__).parent


def configure(project: Path, build: Path, torch_root: Path) -> subprocess.CompletedProcess:
    return _proc.run(
        ["cmake", "-S", str(project), "-B", str(build), f"-DTorch_ROOT={torch_root}",
         f"-DCMAKE_PREFIX_PATH={torch_dir() / 'share' / 'cmake'}"],  # as vLLM's CMakeLists.txt adds the real torch
        capture_output=True, text=True, timeout=300,
    )


def cmake_tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.cmake")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None, reason="needs cmake and a C++ compiler")
def test_cmake_finds_torch_through_the_cpu_view_and_not_without_it(tmp_path):
    import torch

    if torch.version.cuda is None:
        pytest.skip("a CPU build of torch needs no view")
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(CMAKE_PROJECT)
    real_cmake = torch_dir() / "share" / "cmake"
    before = cmake_tree_digest(real_cmake)

    plain = configure(project, tmp_path / "plain", real_cmake / "Torch")
    assert plain.returncode != 0
    assert "uses CUDA but I cannot find the CUDA" in plain.stderr  # the failure the view exists for

    view = build_vllm_cpu.torch_cpu_view(sys.executable, tmp_path / "view")
    viewed = configure(project, tmp_path / "viewed", view)
    assert viewed.returncode == 0, viewed.stderr[-3000:]
    assert "TORCH_LIBRARIES=" in viewed.stdout
    assert cmake_tree_digest(real_cmake) == before, "the installed torch's CMake files were not edited"
    assert (tmp_path / "view" / "torch" / "lib").resolve() == (torch_dir() / "lib").resolve()


def test_platform_check_names_what_is_supported(monkeypatch):
    assert build_vllm_cpu.unsupported_reason() is None or platform.machine() != "x86_64"
    monkeypatch.setattr(build_vllm_cpu.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(build_vllm_cpu.sys, "platform", "darwin")
    reason = build_vllm_cpu.unsupported_reason()
    assert "Linux x86-64" in reason and "darwin arm64" in reason


def test_unsupported_machine_is_one_line_and_set_up_goes_on(tmp_path):
    code = ("import sys, runpy, platform; platform.machine = lambda: 'aarch64'; "
            "sys.argv = ['build_vllm_cpu.py', *sys.argv[1:]]; "
            f"runpy.run_path({str(REPO / 'scripts' / 'build_vllm_cpu.py')!r}, run_name='__main__')")
    check = _proc.run([sys.executable, "-c", code, "--check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == build_vllm_cpu.UNSUPPORTED_EXIT
    assert check.stderr.count("\n") == 1 and "Linux x86-64" in check.stderr
    install = _proc.run([sys.executable, "-c", code, "--install", "r.txt", "--wheel-dir", str(tmp_path)],
                        capture_output=True, text=True, timeout=120)
    assert install.returncode == 0 and install.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir()), "nothing built or installed"


def test_the_wheel_is_installed_with_its_bytecode_compiled(tmp_path):
    """uv (set-up puts it in the venv) writes no .pyc unless told; pip does by default. Where PYTHONDONTWRITEBYTECODE=1
    (CI images set it) nothing writes them later and every process compiles vLLM again. Control: an interpreter
    without uv gets pip, whose default compiles."""
    with_uv = build_vllm_cpu.installer(sys.executable)
    assert with_uv[1:4] == ["-m", "uv", "pip"] and "--compile-bytecode" in with_uv
    bare = tmp_path / "bare"
    _proc.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    assert build_vllm_cpu.installer(str(bare / "bin" / "python"))[1:4] == ["-m", "pip", "install"]


def test_a_built_wheel_is_reused(tmp_path):
    wheel = tmp_path / f"vllm-{build_vllm_cpu.VLLM_VERSION}+cpu-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"")
    if build_vllm_cpu.unsupported_reason():
        pytest.skip(build_vllm_cpu.unsupported_reason())
    proc = _proc.run(
        [sys.executable, str(REPO / "scripts" / "build_vllm_cpu.py"), "--wheel-dir", str(tmp_path),
         "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(wheel) and "reusing" in proc.stderr
    assert not (tmp_path / "work").exists(), "no download, no build"


def _pins(text: str) -> dict[str, str]:
    """{name: version} of the `name==version` lines of a requirements text (comments dropped, names normalized)."""
    pins = {}
    for line in text.splitlines():
        requirement = line.split("#")[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==")
            pins[name.split("[")[0].lower().replace("_", "-")] = version
    return pins


@pytest.mark.slow
def test_flexai_requirements_resolve_next_to_the_runtimes_vllm_and_torch(tmp_path):
    """FlexAI installs code/vlm-grpo/requirements.txt into pytorch-28-vllm-0110-nvidia (vLLM 0.11.0, torch 2.8.0):
    one set of versions must hold both the runtime's packages and every pin (PyPI's metadata only). Resolved with uv
    (pinned in the Makefile, in the venv): the question is whether such a set exists, which is a fact about the
    packages' metadata, and uv answers it in seconds where `pip install --dry-run` took about 30 s here."""
    runtime = tmp_path / "runtime.in"
    runtime.write_text("vllm==0.11.0\ntorch==2.8.0\n")
    proc = _proc.run(
        [sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--no-header", "--no-annotate",
         "--python", sys.executable, str(REPO / "code" / "vlm-grpo" / "requirements.txt"), str(runtime)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = _pins(proc.stdout)  # uv writes the resolution as a requirements text
    assert resolved["vllm"] == "0.11.0" and resolved["torch"] == "2.8.0"
    pins = _pins((REPO / "code" / "vlm-grpo" / "requirements.txt").read_text())
    assert len(pins) == 9  # the file's nine pins: a parse that found none would make the next line vacuous
    assert {name: resolved.get(name) for name in pins} == pins
