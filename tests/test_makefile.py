"""The Makefile's FlexAI and Docker targets, run for real with recording `flexai`/`docker` stand-ins on PATH.

What is checked is the argv the recipes hand to the CLIs: the seed's training command token for token with the
defaults, the overrides, the one-line errors that stop make before anything runs, and that no secret value
passes through make. tests/flexai_stub.py holds the stand-ins.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from flexai_stub import DEFAULT_SECRET, REPO, SECRET_PLACEHOLDER, SEED_ARGV, block_commands, run_make, shell_blocks

MAKEFILE = REPO / "Makefile"
SEED_DOC = REPO.parent / "shared" / "seed" / "vlm-grpo-flexai.md"


def with_secret(argv: list[str], name: str) -> list[str]:
    return [a.replace(SECRET_PLACEHOLDER, name) for a in argv]


def entry(argv: list[str]) -> list[str]:
    """What FlexAI runs on the node: everything after the first `--`."""
    return argv[argv.index("--") + 1 :]


def only_flexai_call(run) -> list[str]:
    assert run.returncode == 0, run.stderr
    calls = run.argv("flexai")
    assert len(calls) == 1, calls
    return calls[0]


def assert_one_line_error(run, *fragments: str) -> None:
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert run.calls == [], "nothing may run after the error"


# ---- the seed command ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not SEED_DOC.is_file(), reason="shared/seed/ is not beside this checkout")
def test_seed_argv_constant_matches_the_seed_document():
    commands = [c for block in shell_blocks(SEED_DOC.read_text()) for c in block_commands(block)]
    runs = [c[1:] for c in commands if c[:3] == ["flexai", "training", "run"]]
    assert runs == [SEED_ARGV]


def test_flexai_train_defaults_run_the_seed_command(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-train"))
    assert argv == with_secret(SEED_ARGV, DEFAULT_SECRET)


def test_flexai_train_with_the_seed_placeholder_is_token_identical(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-train", f"SECRET={SECRET_PLACEHOLDER}"))
    assert argv == SEED_ARGV


def config_num_processes() -> int:
    text = (REPO / "code/vlm-grpo/deepspeed_zero3.yaml").read_text()
    return int(re.search(r"^num_processes:\s*(\d+)", text, re.M).group(1))


def test_default_accels_equal_the_zero3_config_processes():
    # the default command adds no --num_processes only because the yaml already says 2
    assert config_num_processes() == int(SEED_ARGV[SEED_ARGV.index("--accels") + 1])


# ---- overrides ----------------------------------------------------------------------------------------------------


def test_accels_override_sets_the_accelerate_process_count(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-train", "ACCELS=4"))
    expected = with_secret(SEED_ARGV, DEFAULT_SECRET)
    expected[expected.index("--accels") + 1] = "4"
    cfg = expected.index("--config_file=code/vlm-grpo/deepspeed_zero3.yaml")
    expected[cfg + 1 : cfg + 1] = ["--num_processes", "4"]
    assert argv == expected


def test_accels_one_also_overrides_the_config(tmp_path):
    launch = entry(only_flexai_call(run_make(tmp_path, "flexai-train", "ACCELS=1")))
    assert launch[:5] == ["accelerate", "launch", "--config_file=code/vlm-grpo/deepspeed_zero3.yaml", "--num_processes", "1"]


def test_multi_node_is_refused_with_one_line(tmp_path):
    run = run_make(tmp_path, "flexai-train", "NODES=2")
    assert_one_line_error(run, "NODES=2", "multi-node", "README")


@pytest.mark.parametrize("bad", ["ACCELS=0", "ACCELS=two", "NODES=-1"])
def test_non_numeric_counts_are_refused(tmp_path, bad):
    assert_one_line_error(run_make(tmp_path, "flexai-train", bad), "positive integers")


def test_knob_overrides_land_in_their_flags(tmp_path):
    run = run_make(
        tmp_path, "flexai-train",
        "NAME=my-job", "SECRET=my-hf", "MODEL=Qwen/Qwen2.5-VL-7B-Instruct", "RUNTIME=other-runtime",
        "REPO_URL=https://github.com/me/fork", "REVISION=my-branch",
    )
    argv = only_flexai_call(run)
    assert argv[:14] == [
        "training", "run", "my-job",
        "--repository-url", "https://github.com/me/fork", "--repository-revision", "my-branch",
        "--requirements-path", "code/vlm-grpo/requirements.txt",
        "--secret", "HF_TOKEN=my-hf", "--runtime", "other-runtime", "--nodes",
    ]
    launch = entry(argv)
    assert launch[launch.index("--model_name_or_path") + 1] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert launch[launch.index("--output_dir") + 1] == "/output-checkpoint/grpo-Qwen2.5-VL-7B-Instruct"


def test_output_and_args_override(tmp_path):
    run = run_make(tmp_path, "flexai-train", "OUTPUT=/output-checkpoint/run2", "ARGS=--max_steps 50 --learning_rate 2e-5")
    launch = entry(only_flexai_call(run))
    assert launch[launch.index("--output_dir") + 1] == "/output-checkpoint/run2"
    # ARGS come last, so a repeated flag wins over the seed's value
    seed_launch = entry(with_secret(SEED_ARGV, DEFAULT_SECRET))
    seed_launch[seed_launch.index("--output_dir") + 1] = "/output-checkpoint/run2"
    assert launch == seed_launch + ["--max_steps", "50", "--learning_rate", "2e-5"]


def test_values_with_shell_characters_reach_flexai_intact(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-train", "NAME=it's a job", "SECRET=a&b"))
    assert argv[2] == "it's a job"
    assert argv[argv.index("--secret") + 1] == "HF_TOKEN=a&b"


# ---- resume, monitoring, checkpoints ------------------------------------------------------------------------------


def test_flexai_resume_is_the_training_command_plus_the_checkpoint(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-resume", "CKPT=3784735b-d7c6"))
    train = with_secret(SEED_ARGV, DEFAULT_SECRET)
    assert argv[2] == "vlm-grpo-training-resume"
    dash = argv.index("--")
    assert argv[dash - 2 : dash] == ["--checkpoint", "3784735b-d7c6"]
    assert argv[3 : dash - 2] == train[3 : train.index("--")]
    assert entry(argv) == entry(train)


def test_flexai_resume_follows_accels(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-resume", "CKPT=x", "ACCELS=8", "RESUME_NAME=again"))
    assert argv[2] == "again"
    assert entry(argv)[3:5] == ["--num_processes", "8"]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("flexai-inspect", ["training", "inspect", "vlm-grpo-training"]),
        ("flexai-logs", ["training", "logs", "vlm-grpo-training"]),
        ("flexai-checkpoints", ["training", "checkpoints", "vlm-grpo-training"]),
        ("flexai-connect", ["code-registry", "connect"]),
        ("flexai-secret", ["secret", "create", DEFAULT_SECRET]),
    ],
)
def test_simple_targets(tmp_path, target, expected):
    assert only_flexai_call(run_make(tmp_path, target)) == expected


def test_monitoring_targets_follow_name(tmp_path):
    assert only_flexai_call(run_make(tmp_path, "flexai-logs", "NAME=other")) == ["training", "logs", "other"]


def test_flexai_fetch(tmp_path):
    assert only_flexai_call(run_make(tmp_path, "flexai-fetch", "CKPT=abc-123")) == ["checkpoint", "fetch", "abc-123"]


@pytest.mark.parametrize("target", ["flexai-resume", "flexai-fetch"])
def test_missing_ckpt_is_one_line_and_runs_nothing(tmp_path, target):
    assert_one_line_error(run_make(tmp_path, target), "CKPT is not set", f"make {target} CKPT=")


@pytest.mark.parametrize(
    "target", ["flexai-connect", "flexai-secret", "flexai-train", "flexai-resume", "flexai-inspect",
               "flexai-logs", "flexai-checkpoints", "flexai-fetch"],
)
def test_missing_cli_is_one_line_and_runs_nothing(tmp_path, target):
    path_tail = "/usr/bin:/bin"
    if shutil.which("flexai", path=path_tail):
        pytest.skip("a real flexai CLI is installed in /usr/bin or /bin")
    run = run_make(tmp_path, target, "CKPT=x", tools=("docker",), path_tail=path_tail)
    assert_one_line_error(run, "`flexai` CLI not found", "https://docs.flex.ai/cli/")


# ---- secrets -------------------------------------------------------------------------------------------------------


def test_secret_value_goes_through_stdin_only(tmp_path):
    token = "hf_NeverPrintThisValue123"
    run = run_make(tmp_path, "flexai-secret", "SECRET=my-token", stdin=token + "\n")
    assert only_flexai_call(run) == ["secret", "create", "my-token"]
    # the CLI got the value on its prompt, from the user's terminal, not from make
    assert (run.calls_dir / "000-flexai.stdin-length").read_text() == str(len(token))
    recorded = "".join(p.read_text() for p in run.calls_dir.iterdir())
    assert token not in run.stdout + run.stderr + recorded


def test_no_target_prints_a_token_from_the_environment(tmp_path):
    token = "hf_EnvTokenMustStayHidden"
    for target in ("info", "flexai-train", "help"):
        run = run_make(tmp_path / target, target, env_extra={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token})
        assert run.returncode == 0, run.stderr
        recorded = "".join("\n".join(args) for _, args in run.calls)
        assert token not in run.stdout + run.stderr + recorded


def test_makefile_holds_no_token_knob():
    # secrets are passed by name: no knob may carry a token value into a command line
    knobs = re.findall(r"^([A-Z_]+) \?=", MAKEFILE.read_text(), re.M)
    assert not [k for k in knobs if re.search(r"TOKEN|PASSWORD|API_KEY", k)]


# ---- help and info --------------------------------------------------------------------------------------------


def knob_names() -> list[str]:
    return re.findall(r"^([A-Z_]+) \?=", MAKEFILE.read_text(), re.M)


def test_every_knob_is_documented_on_its_own_comment_line():
    lines = MAKEFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^([A-Z_]+) \?=(.*)$", line)
        if not match:
            continue
        name, value = match.groups()
        assert lines[i - 1].startswith(f"## {name}: "), f"{name} lacks a `## {name}: ...` line above it"
        # make keeps trailing spaces and inline comments in a value
        assert "#" not in value or value.strip().startswith("$("), f"{name}: comment on the value line"
        assert value == value.rstrip() or not value.strip(), f"{name}: trailing whitespace"


def test_help_is_the_default_goal_and_lists_targets_and_knobs(tmp_path):
    default = run_make(tmp_path / "default")
    help_run = run_make(tmp_path / "help", "help")
    assert default.returncode == help_run.returncode == 0
    assert default.stdout == help_run.stdout
    targets = re.findall(r"^([a-z][a-z0-9-]*):.*## ", MAKEFILE.read_text(), re.M)
    for name in targets + knob_names():
        assert re.search(rf"^  {re.escape(name)} ", help_run.stdout, re.M), f"{name} missing from make help"
    assert "[vlm-grpo-training]" in help_run.stdout  # defaults are shown


def test_phony_covers_every_documented_target():
    text = MAKEFILE.read_text()
    phony = set(" ".join(re.findall(r"^\.PHONY:((?:.*\\\n)*.*)$", text, re.M)).replace("\\", " ").split())
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):.*## ", text, re.M))
    assert targets <= phony, targets - phony


def test_info_prints_resolved_values(tmp_path):
    run = run_make(tmp_path, "info", "ACCELS=4", "MODEL=org/Some-VL")
    assert run.returncode == 0, run.stderr
    for name in knob_names():
        assert re.search(rf"^  {name} ", run.stdout, re.M), f"{name} missing from make info"
    assert re.search(r"^  OUTPUT +/output-checkpoint/grpo-Some-VL$", run.stdout, re.M)
    assert re.search(r"^  processes +4 ", run.stdout, re.M)
    assert "--num_processes 4" in run.stdout
    assert run.calls == []


def test_info_command_line_is_what_flexai_train_runs(tmp_path):
    import shlex

    info = run_make(tmp_path / "info", "info", "ACCELS=4", "SECRET=<x>")
    printed = info.stdout.split("make flexai-train runs:\n", 1)[1].strip()
    train = run_make(tmp_path / "train", "flexai-train", "ACCELS=4", "SECRET=<x>")
    assert shlex.split(printed)[1:] == only_flexai_call(train)


# ---- Docker targets ----------------------------------------------------------------------------------------------


def docker_calls(run) -> list[list[str]]:
    assert run.returncode == 0, run.stderr
    return [args for args in run.argv("docker") if args[:1] != ["info"]]


def test_docker_build_uses_the_dockerfile_and_versioned_tag(tmp_path):
    calls = docker_calls(run_make(tmp_path, "docker-build"))
    assert calls == [["build", "-f", "docker/Dockerfile", "-t", "vlm-grpo:torch2.8.0-cu12.8-vllm0.11.0", "."]]


def test_local_smoke_on_cpu(tmp_path):
    run = run_make(tmp_path, "local-smoke", "DOCKER_GPUS=", "LOCAL_SMOKE_DIR=" + str(tmp_path / "out"))
    build, smoke = docker_calls(run)
    assert build[0] == "build"
    assert smoke[:2] == ["run", "--rm"]
    assert "--gpus" not in smoke
    assert ["-e", "SMOKE_VLLM=0"] == smoke[smoke.index("SMOKE_VLLM=0") - 1 : smoke.index("SMOKE_VLLM=0") + 1]
    assert f"{tmp_path / 'out'}:/workspace/outputs/smoke" in smoke
    assert smoke[-1] == "vlm-grpo:torch2.8.0-cu12.8-vllm0.11.0"  # the image's CMD: scripts/smoke.sh
    assert (tmp_path / "out").is_dir()


def test_local_smoke_with_gpus_runs_vllm(tmp_path):
    smoke = docker_calls(run_make(tmp_path, "local-smoke", "DOCKER_GPUS=all", f"LOCAL_SMOKE_DIR={tmp_path}/o"))[1]
    i = smoke.index("--gpus")
    assert smoke[i : i + 4] == ["--gpus", "all", "-e", "SMOKE_VLLM=1"]


def test_local_smoke_detects_gpus(tmp_path):
    run = run_make(
        tmp_path, "local-smoke", f"LOCAL_SMOKE_DIR={tmp_path}/o",
        tools=("docker", "nvidia-smi"), env_extra={"STUB_DOCKER_RUNTIMES": '{"nvidia":{},"runc":{}}'},
    )
    assert "SMOKE_VLLM=1" in docker_calls(run)[1]


def test_local_smoke_without_nvidia_runtime_stays_on_cpu(tmp_path):
    run = run_make(tmp_path, "local-smoke", f"LOCAL_SMOKE_DIR={tmp_path}/o", tools=("docker", "nvidia-smi"))
    smoke = docker_calls(run)[1]
    assert "--gpus" not in smoke and "SMOKE_VLLM=0" in smoke


def test_missing_docker_is_one_line(tmp_path):
    if shutil.which("docker", path="/usr/bin:/bin"):
        path_tail = str(tmp_path / "empty")  # hide the real docker CLI; make itself is found by absolute path
        Path(path_tail).mkdir()
    else:
        path_tail = "/usr/bin:/bin"
    run = run_make(tmp_path, "docker-build", tools=(), path_tail=path_tail)
    assert_one_line_error(run, "`docker` not found", "install Docker", "or set DOCKER=podman")


def test_missing_podman_does_not_suggest_podman(tmp_path):
    run = run_make(tmp_path, "docker-build", "DOCKER=podman-not-installed", tools=())
    assert_one_line_error(run, "`podman-not-installed` not found on PATH", "set DOCKER to an engine CLI")
    assert "DOCKER=podman" not in run.stderr


def test_docker_without_a_daemon_is_one_line(tmp_path):
    # a docker CLI whose daemon is down: `docker info` fails, as the real client's does without a daemon
    bin_dir = tmp_path / "no-daemon-bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    run = run_make(tmp_path, "docker-build", tools=(), path_tail=f"{bin_dir}:/usr/bin:/bin")
    assert_one_line_error(run, "`docker info` fails", "cannot reach its engine", "systemctl start docker")
    assert "Cannot connect" not in run.stderr  # docker's own noise stays out


# ---- set-up: the CPU build of vLLM ------------------------------------------------------------------------------


def dry_make(*args: str) -> str:
    """What make would run (`make -n`), for a venv that does not exist yet: the whole set-up chain shows."""
    proc = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("target", ["smoke", "test", "vllm-cpu"])
def test_set_up_builds_and_installs_vllm_for_cpu(tmp_path, target):
    out = dry_make(target, f"VENV={tmp_path}/venv")
    build = [line for line in out.splitlines() if "scripts/build_vllm_cpu.py" in line]
    assert len(build) == 1, out
    # the project's pins and vLLM's runtime pins in one resolver call: torch stays the pinned 2.8.0
    assert build[0].endswith("--install code/vlm-grpo/requirements-dev.txt code/vlm-grpo/requirements-vllm-cpu.txt")
    assert "--wheel-dir .cache/wheels" in build[0]  # not .whl/: the device machine's wheels live there
    assert out.index("pip install -r code/vlm-grpo/requirements-dev.txt") < out.index("scripts/build_vllm_cpu.py")


def test_smoke_without_vllm_skips_the_build(tmp_path):
    out = dry_make("smoke", "SMOKE_VLLM=0", f"VENV={tmp_path}/venv")
    assert "build_vllm_cpu.py" not in out and "SMOKE_VLLM=0" in out


# ---- learning demo -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("knobs, figure", [
    ((), "outputs/learning-demo/learning_demo.png"),
    (("DEMO_DIR=/tmp/demo",), "/tmp/demo/learning_demo.png"),
    # the committed figure of the guide changes only when someone names it
    (("DEMO_FIGURE=experiments/vlm-grpo/figures/learning_demo.png",), "experiments/vlm-grpo/figures/learning_demo.png"),
])
def test_learning_demo_writes_its_figure_under_outputs_unless_told(tmp_path, knobs, figure):
    run = run_make(tmp_path, "-n", "learning-demo", *knobs)
    assert run.returncode == 0, run.stderr
    (line,) = [line for line in run.stdout.splitlines() if "scripts/learning_demo.py" in line]
    argv = shlex.split(line)
    assert argv[argv.index("--figure") + 1] == figure
