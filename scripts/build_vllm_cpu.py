"""Build vLLM 0.11.0 for CPU from PyPI's sdist into a cached wheel (Linux x86-64), for tests and `make smoke`.

PyPI has no CPU wheel of vLLM 0.11.0 (only CUDA wheels and the sdist), and the FlexAI runtime's vLLM cannot run
without a GPU, so CPU machines (CI, laptops with Linux) build their own. What the build needs, each found the hard
way:

- VLLM_TARGET_DEVICE=cpu, `pip wheel --no-build-isolation` against the venv's torch 2.8.0 (the wheel must match the
  torch it will run with), the build tools of vLLM's requirements/cpu-build.txt.
- torch's CMake config refuses to load without CUDA libraries when torch is PyPI's CUDA build (`Caffe2Config.cmake:
  Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries`). We do not edit the installed torch:
  CMake gets a CPU-only *view* of it (its files linked, only the two CMake config files copied with the CUDA blocks
  switched off), found first through `Torch_ROOT` (vLLM's setup.py does not forward CMAKE_ARGS).
- VLLM_CPU_DISABLE_AVX512=true: on an AVX512 machine vLLM's cmake/cpu_extension.cmake would download oneDNN from
  GitHub at build time (no internet here). The AVX2 kernels need no download and run on AVX512 machines too, so the
  cached wheel also works on whatever x86-64 CI machine picks it up.
- numa.h (Debian's libnuma-dev) for csrc/cpu/utils.cpp: installed with apt-get where we are root, else one line
  says which package to install.

    python scripts/build_vllm_cpu.py --wheel-dir .cache/wheels   # prints the wheel's path; a cached wheel is reused
    python scripts/build_vllm_cpu.py --install REQUIREMENTS...   # also installs it (what `make vllm-cpu` runs)

`--install` puts the wheel into the interpreter's environment with `--no-deps` (its metadata asks for torch 2.8.0+cpu
and triton 3.2.0, which would replace the venv's torch), then the given requirements files together, so pip's
resolver keeps every pin of the project (torch 2.8.0 included) and only adds vLLM's runtime requirements.
Where the CPU build cannot work (not Linux x86-64), one line says so: exit status 3, or 0 with `--install` (set-up
goes on; smoke and the tests then generate with transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

VLLM_VERSION = "0.11.0"
# The sdist's address and digest on PyPI (https://pypi.org/simple/vllm/): a changed file is refused.
SDIST_URL = (
    "https://files.pythonhosted.org/packages/82/5a/36d2351206f4d8d871b10780f874d03957985e08298d430cc837723e07af/"
    "vllm-0.11.0.tar.gz"
)
SDIST_SHA256 = "f435a64c24e9c4178d657a76f8edd8548ddc444012f7d06a9f79ac3a6392bfae"
# vLLM 0.11.0's requirements/cpu-build.txt, minus torch (the venv's is used): build tools only, kept out of the venv.
BUILD_TOOLS = [
    "cmake==3.31.6",
    "ninja==1.11.1.4",
    "packaging==25.0",
    "setuptools==79.0.1",
    "setuptools-scm==8.3.1",
    "wheel==0.45.1",
    "jinja2==3.1.6",
    "regex==2025.9.18",
]
UNSUPPORTED_EXIT = 3


def log(msg: str) -> None:
    print(f"build_vllm_cpu: {msg}", file=sys.stderr, flush=True)


def unsupported_reason() -> str | None:
    """Why this machine cannot build vLLM for CPU (None when it can)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return (
            f"vLLM's CPU build is set up for Linux x86-64 only (this is {sys.platform} {platform.machine()}): "
            "smoke and tests generate with transformers instead"
        )
    return None


def cached_wheel(wheel_dir: Path) -> Path | None:
    found = sorted(wheel_dir.glob(f"vllm-{VLLM_VERSION}+cpu-*.whl"))
    return found[-1] if found else None


def installer(python: str) -> list[str]:
    """`uv pip install` into that interpreter's environment where set-up put uv there (the Makefile does), else pip."""
    has_uv = subprocess.run([python, "-c", "import uv"], capture_output=True, check=False).returncode == 0
    # --compile-bytecode: pip's default (the Makefile's install says why it matters)
    uv = [python, "-m", "uv", "pip", "install", "-q", "--compile-bytecode", "--python", python]
    return uv if has_uv else [python, "-m", "pip", "install", "-q"]


def ensure_numa_headers() -> None:
    """numa.h for vLLM's CPU kernels; apt-get where we can, else a one-line instruction."""
    probe = subprocess.run(
        ["cc", "-E", "-x", "c", "-"], input="#include <numa.h>\n", text=True, capture_output=True, check=False
    )
    if probe.returncode == 0:
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        log("installing libnuma-dev (numa.h, needed by vLLM's CPU kernels) with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "libnuma-dev"], check=True, env=env)
        return
    sys.exit(
        "build_vllm_cpu: numa.h not found: install libnuma-dev (Debian/Ubuntu: `sudo apt-get install libnuma-dev`; "
        "Fedora: numactl-devel), then run this again"
    )


def download_sdist(dest: Path) -> Path:
    path = dest / Path(SDIST_URL).name
    if not path.exists():
        log(f"downloading {SDIST_URL}")
        with urllib.request.urlopen(SDIST_URL, timeout=120) as response, open(path.with_suffix(".part"), "wb") as out:
            shutil.copyfileobj(response, out)
        path.with_suffix(".part").rename(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        path.unlink()
        sys.exit(f"build_vllm_cpu: {path.name} has sha256 {digest}, expected {SDIST_SHA256}: refusing to build it")
    return path


def torch_cpu_view(python: str, view: Path) -> Path:
    """A folder CMake can take for torch: every file of the installed torch linked, except share/cmake/{Caffe2,Torch}
    config files, which are copies with their CUDA blocks turned off. Returns the Torch_ROOT to use."""
    torch_dir = Path(
        subprocess.run(
            [python, "-c", "import torch, os; print(os.path.dirname(torch.__file__))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )
    if view.exists():
        shutil.rmtree(view)
    root = view / "torch"
    root.mkdir(parents=True)
    for entry in torch_dir.iterdir():
        if entry.name != "share":
            (root / entry.name).symlink_to(entry)
    (root / "share").mkdir()
    for entry in (torch_dir / "share").iterdir():
        if entry.name != "cmake":
            (root / "share" / entry.name).symlink_to(entry)
    shutil.copytree(torch_dir / "share" / "cmake", root / "share" / "cmake", symlinks=True)

    caffe2 = root / "share/cmake/Caffe2/Caffe2Config.cmake"
    text = caffe2.read_text()
    cuda_block = "if(ON)\n  # The file public/cuda.cmake exclusively uses CAFFE2_USE_*."
    targets = 'include ("${CMAKE_CURRENT_LIST_DIR}/Caffe2Targets.cmake")'
    if cuda_block not in text or targets not in text:
        sys.exit(f"build_vllm_cpu: {caffe2.name} does not look like torch 2.8's: cannot make a CPU-only view of it")
    text = text.replace(cuda_block, cuda_block.replace("if(ON)", "if(OFF)  # CPU-only view (build_vllm_cpu.py)"))
    # c10_cuda's link interface names torch::cudart, which the switched-off block would have defined
    text = text.replace(targets, "add_library(torch::cudart INTERFACE IMPORTED)\n" + targets)
    caffe2.write_text(text)

    torch_config = root / "share/cmake/Torch/TorchConfig.cmake"
    text = torch_config.read_text()
    nvrtc_block = "if(ON)\n  if(MSVC)\n    find_library(CAFFE2_NVRTC_LIBRARY"
    if nvrtc_block not in text:
        sys.exit(f"build_vllm_cpu: {torch_config.name} does not look like torch 2.8's: cannot make a CPU-only view")
    text = text.replace(nvrtc_block, nvrtc_block.replace("if(ON)", "if(OFF)", 1))
    # vLLM puts the real torch on CMAKE_PREFIX_PATH, which find_package searches before PATHS: pin the view's Caffe2
    find_caffe2 = "find_package(Caffe2 REQUIRED PATHS ${CMAKE_CURRENT_LIST_DIR}/../Caffe2)"
    if find_caffe2 not in text:
        sys.exit(f"build_vllm_cpu: {torch_config.name} does not look like torch 2.8's: cannot make a CPU-only view")
    torch_config.write_text(text.replace(find_caffe2, find_caffe2[:-1] + " NO_DEFAULT_PATH)"))
    return root / "share" / "cmake" / "Torch"


def build(python: str, wheel_dir: Path, work: Path, jobs: int) -> Path:
    ensure_numa_headers()
    work.mkdir(parents=True, exist_ok=True)
    sdist = download_sdist(work)
    src = work / f"vllm-{VLLM_VERSION}"
    if src.exists():
        shutil.rmtree(src)
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")

    tools = work / "build-tools"
    if not (tools / ".done").exists():
        log("installing build tools (into " + str(tools) + ", not the venv)")
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--target", str(tools), *BUILD_TOOLS], check=True
        )
        (tools / ".done").touch()
    torch_root = torch_cpu_view(python, work / "torch-cpu-view")

    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_DISABLE_AVX512": "true",
        "MAX_JOBS": str(jobs),
        "Torch_ROOT": str(torch_root),
        "PYTHONPATH": os.pathsep.join([str(tools), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PATH": os.pathsep.join([str(tools / "bin"), os.environ["PATH"]]),
    }
    log(f"building vLLM {VLLM_VERSION} for CPU with {jobs} jobs (146 s on the 2-core CI machine: experiments/vlm-grpo/cpu-results/setup-and-timings.json)")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as out:
        subprocess.run(
            [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, str(src)],
            check=True, env=env, cwd=work,
        )
        (built,) = Path(out).glob("vllm-*.whl")
        final = wheel_dir / built.name
        shutil.move(str(built), final)  # appears in the cache only once whole
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel-dir", type=Path, default=Path(".cache/wheels"), help="cache folder of the built wheel")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/vllm-cpu-build"), help="sdist and build tree")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose torch the wheel is built for")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    parser.add_argument("--check", action="store_true", help="only say whether this machine can build it")
    parser.add_argument(
        "--install", nargs="+", metavar="REQUIREMENTS", help="install the wheel, then these requirements files together"
    )
    args = parser.parse_args()

    reason = unsupported_reason()
    if reason:
        print(f"build_vllm_cpu: {reason}", file=sys.stderr)
        sys.exit(0 if args.install else UNSUPPORTED_EXIT)
    if args.check:
        return
    wheel = cached_wheel(args.wheel_dir)
    if wheel:
        log(f"reusing {wheel}")
    else:
        wheel = build(args.python, args.wheel_dir, args.work_dir.resolve(), args.jobs)
        shutil.rmtree(args.work_dir.resolve() / f"vllm-{VLLM_VERSION}", ignore_errors=True)
    if args.install:
        pip = installer(args.python)
        subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
        subprocess.run([*pip, *(arg for path in args.install for arg in ("-r", path))], check=True)
    print(wheel)


if __name__ == "__main__":
    main()
