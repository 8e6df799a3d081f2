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
import sys
from pathlib import Path

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)
from flexai_stub import (
    DEFAULT_SECRET,
    REPO,
    SECRET_PLACEHOLDER,
    SEED_ARGV,
    block_commands,
    make_dataset_dir,
    make_ready_model_dir,
    make_stub_dir,
    run_make,
    run_make_with_local_inputs,
    shell_blocks,
)

MAKEFILE = REPO / "Makefile"
# the seed recipe's page, quoted in the maintainers' notes
SEED_DOC = REPO / "experiments" / "vlm-grpo" / "INTERNALS.md"


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


def test_seed_argv_constant_matches_the_seed_document():
    text = SEED_DOC.read_text()
    (block,) = [b for b in re.findall(r"^```text\n(.*?)^```", text, re.S | re.M) if b.startswith("flexai training run")]
    assert shlex.split(block.replace("\\\n", " "))[1:] == SEED_ARGV


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


# ---- multi-node: FlexAI's torchrun on every node, the bare script, ZeRO-3 from the DeepSpeed JSON -------------------


def test_multi_node_runs_the_bare_script_with_the_deepspeed_json(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-train", "NODES=2", "ACCELS=8"))
    seed = with_secret(SEED_ARGV, DEFAULT_SECRET)
    expected_flags = seed[: seed.index("--")]
    expected_flags[expected_flags.index("--nodes") + 1 : expected_flags.index("--accels") + 2] = ["2", "--accels", "8"]
    assert argv[: argv.index("--")] == expected_flags
    script_args = entry(seed)[entry(seed).index("code/vlm-grpo/grpo_vlm.py") + 1 :]
    # FlexAI's CLI wraps a plain-script entry in torchrun itself, which reads no accelerate yaml
    assert entry(argv) == ["code/vlm-grpo/grpo_vlm.py", "--deepspeed", "code/vlm-grpo/deepspeed_zero3.json", *script_args]


def test_multi_node_resume_and_args_keep_their_places(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-resume", "CKPT=c1", "NODES=4", "ACCELS=2", "ARGS=--max_steps 9"))
    assert entry(argv)[:3] == ["code/vlm-grpo/grpo_vlm.py", "--deepspeed", "code/vlm-grpo/deepspeed_zero3.json"]
    assert entry(argv)[-4:] == ["--resume", "require", "--max_steps", "9"]


def test_info_explains_the_multi_node_route(tmp_path):
    run = run_make(tmp_path, "info", "NODES=2", "ACCELS=8")
    assert run.returncode == 0, run.stderr
    launcher = re.search(r"^  launcher +(.*)$", run.stdout, re.M).group(1)
    assert "torchrun" in launcher and "code/vlm-grpo/deepspeed_zero3.json" in launcher
    assert re.search(r"^  processes +16 ", run.stdout, re.M)
    assert "accelerate launch" in re.search(r"^  launcher +(.*)$", run_make(tmp_path / "one", "info").stdout, re.M).group(1)


@pytest.mark.parametrize("bad", ["ACCELS=0", "ACCELS=two", "NODES=-1", "NODES=0", "NODES=1.5", "ACCELS=2x"])
def test_non_numeric_counts_are_refused(tmp_path, bad):
    assert_one_line_error(run_make(tmp_path, "flexai-train", bad), "positive integers")


@pytest.mark.parametrize("knobs, fragments", [
    # 3 processes x 8 completions each = 24 completions, groups of 16: TRL's GRPOConfig refuses it at start-up
    (("NODES=3", "ACCELS=1", "ARGS=--num_generations 16"), ("3 processes", "24 completions", "--num_generations 16")),
    (("NODES=2", "ACCELS=3", "ARGS=--per_device_train_batch_size 2 --num_generations=8"), ("6 processes", "12 completions")),
    (("NODES=2", "ACCELS=2", "ARGS=--generation_batch_size 36"), ("--generation_batch_size 36", "4 processes")),
    (("NODES=2", "ACCELS=3", "ARGS=--vllm_tensor_parallel_size 4"), ("--vllm_tensor_parallel_size 4", "6 processes")),
])
def test_a_process_count_the_batch_cannot_split_is_refused(tmp_path, knobs, fragments):
    assert_one_line_error(run_make(tmp_path, "flexai-train", *knobs), *fragments)


@pytest.mark.parametrize("knobs", [
    ("NODES=2", "ACCELS=8"),
    ("NODES=3", "ACCELS=1", "ARGS=--num_generations 12"),  # 24 completions in groups of 12
    ("NODES=2", "ACCELS=3", "ARGS=--per_device_train_batch_size 4 --steps_per_generation 2 --num_generations 8"),
])
def test_process_counts_that_split_are_accepted(tmp_path, knobs):
    only_flexai_call(run_make(tmp_path, "flexai-train", *knobs))


def test_the_split_rule_is_trls(tmp_path, monkeypatch):
    """The Makefile's arithmetic against GRPOConfig itself: TRL refuses exactly the settings make refuses."""
    from trl import GRPOConfig

    def trl_accepts(world_size: int, **kwargs) -> bool:
        # the world size torchrun would give NODES x ACCELS processes
        monkeypatch.setattr(GRPOConfig, "world_size", property(lambda self: world_size))
        try:
            GRPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, report_to=[], **kwargs)
        except ValueError:
            return False
        return True

    cases = [(3, {"num_generations": 16}), (3, {"num_generations": 12}), (6, {"per_device_train_batch_size": 2}),
             (4, {"generation_batch_size": 36}), (4, {"generation_batch_size": 64})]
    verdicts = []
    for world, args in cases:
        flags = " ".join(f"--{k} {v}" for k, v in args.items())
        run = run_make(tmp_path / str(len(verdicts)), "flexai-train", f"NODES={world}", "ACCELS=1", f"ARGS={flags}")
        verdicts.append(run.returncode == 0)
        assert verdicts[-1] == trl_accepts(world, **args), (world, args, run.stderr)
    assert True in verdicts and False in verdicts  # both outcomes compared


# ---- resume, monitoring, checkpoints ------------------------------------------------------------------------------


def test_flexai_resume_is_the_training_command_plus_the_checkpoint(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-resume", "CKPT=3784735b-d7c6"))
    train = with_secret(SEED_ARGV, DEFAULT_SECRET)
    assert argv[2] == "vlm-grpo-training-resume"
    dash = argv.index("--")
    assert argv[dash - 2 : dash] == ["--checkpoint", "3784735b-d7c6"]
    assert argv[3 : dash - 2] == train[3 : train.index("--")]
    # the job was started to resume: the script must find the checkpoint or fail, never start fresh
    assert entry(argv) == entry(train) + ["--resume", "require"]


def test_flexai_train_never_asks_to_resume(tmp_path):
    assert "--resume" not in only_flexai_call(run_make(tmp_path, "flexai-train"))


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
        ("flexai-stop", ["training", "stop", "vlm-grpo-training"]),
        ("flexai-serve-delete", ["inference", "delete", "vlm-grpo-training-endpoint"]),
    ],
)
def test_simple_targets(tmp_path, target, expected):
    assert only_flexai_call(run_make(tmp_path, target)) == expected


def test_monitoring_targets_follow_name(tmp_path):
    assert only_flexai_call(run_make(tmp_path, "flexai-logs", "NAME=other")) == ["training", "logs", "other"]


def test_flexai_fetch_downloads_into_a_named_folder(tmp_path):
    # --destination as FlexAI's own blueprints pass it; by default a folder named after the checkpoint
    assert only_flexai_call(run_make(tmp_path / "a", "flexai-fetch", "CKPT=abc-123")) == \
        ["checkpoint", "fetch", "abc-123", "--destination", "outputs/checkpoints/abc-123"]
    assert only_flexai_call(run_make(tmp_path / "b", "flexai-fetch", "CKPT=abc-123", "DEST=outputs/adapter")) == \
        ["checkpoint", "fetch", "abc-123", "--destination", "outputs/adapter"]


def test_endpoint_url_prints_the_url_alone(tmp_path):
    run = run_make(tmp_path, "-s", "flexai-endpoint-url", env_extra={"STUB_ENDPOINT_URL": "https://ep.example/x"})
    assert only_flexai_call(run) == ["inference", "inspect", "vlm-grpo-training-endpoint", "-j"]
    assert run.stdout == "https://ep.example/x\n"  # what `export ENDPOINT_URL=$(make -s flexai-endpoint-url)` takes


def test_flexai_bench_runs_the_benchmark_on_the_runtime(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-bench"))
    assert argv[:3] == ["training", "run", "vlm-grpo-training-bench"]
    assert argv[argv.index("--runtime") + 1] == "pytorch-28-vllm-0110-nvidia"
    assert argv[argv.index("--accels") + 1] == "2"
    job = entry(argv)
    assert job[:4] == ["python3", "scripts/bench.py", "--out", "/tmp/bench"]
    assert "--configs" in job and "--steps" in job
    # the job's arguments are ones bench.py accepts (its own parser, not a copy of it)
    check = _proc.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--help"], capture_output=True,
                           text=True, timeout=60)
    for flag in (a for a in job[2:] if a.startswith("--")):
        assert flag in check.stdout, f"bench.py has no {flag}"


def test_flexai_bench_knobs_and_refusals(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()  # the stub records per folder
    job = entry(only_flexai_call(run_make(tmp_path / "a", "flexai-bench", "BENCH_JOB_ARGS=--configs seed --steps 1")))
    assert job[4:] == ["--configs", "seed", "--steps", "1"]
    assert_one_line_error(run_make(tmp_path / "b", "flexai-bench", "NODES=2"), "NODES=2", "one node")


@pytest.mark.parametrize("target", ["flexai-resume", "flexai-fetch"])
def test_missing_ckpt_is_one_line_and_runs_nothing(tmp_path, target):
    assert_one_line_error(run_make(tmp_path, target), "CKPT is not set", f"make {target} CKPT=")


@pytest.mark.parametrize(
    "target", ["flexai-connect", "flexai-secret", "flexai-train", "flexai-resume", "flexai-inspect",
               "flexai-logs", "flexai-checkpoints", "flexai-stop", "flexai-fetch", "flexai-dataset-push",
               "flexai-checkpoint-push", "flexai-serve", "flexai-endpoint", "flexai-endpoint-url", "flexai-serve-delete",
               "flexai-bench"],
)
def test_missing_cli_is_one_line_and_runs_nothing(tmp_path, target):
    path_tail = "/usr/bin:/bin"
    if shutil.which("flexai", path=path_tail):
        pytest.skip("a real flexai CLI is installed in /usr/bin or /bin")
    run = run_make(tmp_path, target, "CKPT=x", "DATASET=d", "DIR=d", tools=("docker",), path_tail=path_tail)
    assert_one_line_error(run, "`flexai` CLI not found", "https://docs.flex.ai/cli/")


# ---- datasets, trackers, job environment -----------------------------------------------------------------------


def test_dataset_mounts_and_points_the_script_at_it(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-train", "DATASET=my-vqa"))
    dash = argv.index("--")
    assert argv[dash - 2 : dash] == ["--dataset", "my-vqa"]
    launch = entry(argv)
    assert launch[-2:] == ["--dataset_name", "/input/my-vqa"]  # FlexAI mounts a dataset at /input/<name>
    assert entry(only_flexai_call(run_make(tmp_path / "args", "flexai-train", "DATASET=d", "ARGS=--max_steps 5")))[-4:] \
        == ["--dataset_name", "/input/d", "--max_steps", "5"]  # ARGS still last


def test_wandb_comes_from_a_secret_by_name_and_turns_reporting_on(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-train", "WANDB_SECRET=wandb-key"))
    flags = argv[: argv.index("--")]
    assert [flags[i + 1] for i, a in enumerate(flags) if a == "--secret"] == ["HF_TOKEN=hf-token", "WANDB_API_KEY=wandb-key"]
    assert entry(argv)[-2:] == ["--report_to", "wandb"]
    assert "--report_to" not in only_flexai_call(run_make(tmp_path / "default", "flexai-train"))


@pytest.mark.parametrize("knobs, expected", [((), []), (("WANDB_SECRET=w",), ["wandb"])])
def test_the_jobs_trackers_as_the_script_parses_them(tmp_path, knobs, expected):
    """The seed's command leaves --report_to unset, which transformers reads as every installed tracker: the script
    turns that into none, and WANDB_SECRET into wandb (the arguments of the job's entry, parsed by grpo_vlm.py)."""
    import grpo_vlm

    launch = entry(only_flexai_call(run_make(tmp_path, "flexai-train", *knobs)))
    script_args = launch[launch.index("code/vlm-grpo/grpo_vlm.py") + 1 :]
    script_args[script_args.index("--output_dir") + 1] = str(tmp_path / "out")
    assert grpo_vlm.parse_args(script_args)[1].report_to == expected


def test_env_words_become_env_flags(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-train", "ENV=WANDB_PROJECT=vlm-grpo WANDB_ENTITY=my"))
    flags = argv[: argv.index("--")]
    assert [flags[i + 1] for i, a in enumerate(flags) if a == "--env"] == ["WANDB_PROJECT=vlm-grpo", "WANDB_ENTITY=my"]


def test_env_flags_in_order(tmp_path):
    argv = only_flexai_call(run_make(tmp_path, "flexai-resume", "CKPT=c", "ENV=A=1 B=x=y TOKENIZERS_PARALLELISM=false"))
    flags = argv[: argv.index("--")]
    assert [flags[i + 1] for i, a in enumerate(flags) if a == "--env"] == ["A=1", "B=x=y", "TOKENIZERS_PARALLELISM=false"]


@pytest.mark.parametrize("env, fragments", [
    ("WANDB_API_KEY=wk-SecretValue1", ("ENV sets WANDB_API_KEY", "FlexAI secret", "WANDB_SECRET=")),
    ("HF_TOKEN=hf_SecretValue2", ("ENV sets HF_TOKEN", "FlexAI secret")),
    ("A=1 aws_secret_access_key=SecretValue3", ("ENV sets aws_secret_access_key",)),
    ("novalue", ("K=V", "novalue")),
])
def test_bad_env_is_one_line_and_never_echoes_a_value(tmp_path, env, fragments):
    for target in ("flexai-train", "info"):  # info would print the ENV knob's value
        run = run_make(tmp_path / target, target, f"ENV={env}")
        assert_one_line_error(run, *fragments)
        assert "SecretValue" not in run.stdout + run.stderr


def test_dataset_push_checks_the_folder_with_the_scripts_loader_then_pushes(tmp_path):
    folder = make_dataset_dir(tmp_path / "my data")
    argv = only_flexai_call(run_make(tmp_path, "flexai-dataset-push", f"DIR={folder}", "DATASET=my-vqa"))
    assert argv == ["dataset", "push", "my-vqa", "--file", str(folder)]


@pytest.mark.parametrize("setup, fragments", [
    (lambda p: make_dataset_dir(p / "d", drop=("solution",)), ("no column 'solution' (--solution_column)",)),
    (lambda p: p / "absent", ("no such file or folder",)),
    (lambda p: (p / "empty").mkdir() or p / "empty", ("no dataset found",)),
])
def test_dataset_push_refuses_what_training_would_refuse(tmp_path, setup, fragments):
    folder = setup(tmp_path)
    run = run_make(tmp_path, "flexai-dataset-push", f"DIR={folder}", "DATASET=x")
    assert_one_line_error(run, f"DIR={folder} cannot be pushed", *fragments)


def test_dataset_push_checks_the_column_flags_of_args(tmp_path):
    """The check reads --problem_column (and the other two) from ARGS, as training will: a folder whose question
    column is `problem` is refused for ARGS naming `question`, with the columns it has."""
    folder = make_dataset_dir(tmp_path / "d")
    run = run_make(tmp_path, "flexai-dataset-push", f"DIR={folder}", "DATASET=x", "ARGS=--problem_column question")
    assert_one_line_error(run, f"DIR={folder} cannot be pushed", "no column 'question' (--problem_column)",
                          "its columns are ['image', 'problem', 'solution', 'original_question', 'original_answer']")
    argv = only_flexai_call(run_make(tmp_path / "ok", "flexai-dataset-push", f"DIR={folder}", "DATASET=x",
                                     "ARGS=--problem_column original_question --solution_column=solution"))
    assert argv == ["dataset", "push", "x", "--file", str(folder)]


@pytest.mark.parametrize("knobs, fragment", [(("DIR=x",), "DATASET is not set"), (("DATASET=x",), "DIR is not set")])
def test_dataset_push_needs_both_knobs(tmp_path, knobs, fragment):
    assert_one_line_error(run_make(tmp_path, "flexai-dataset-push", *knobs), fragment)


# ---- checkpoint to endpoint ----------------------------------------------------------------------------------------


def test_checkpoint_push_uploads_an_inference_ready_folder(tmp_path):
    folder = make_ready_model_dir(tmp_path / "merged")
    argv = only_flexai_call(run_make(tmp_path, "flexai-checkpoint-push", f"MERGED={folder}"))
    assert argv == ["checkpoint", "push", "vlm-grpo-training-merged", "--file", str(folder)]
    argv = only_flexai_call(run_make(tmp_path / "named", "flexai-checkpoint-push", f"MERGED={folder}", "CKPT_NAME=v2"))
    assert argv[2] == "v2"


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: make_ready_model_dir(p, architectures=False), "has no `architectures`"),
    (lambda p: make_ready_model_dir(p, drop=("chat_template.jinja",)), "no chat template"),
    (lambda p: make_ready_model_dir(p, drop=("preprocessor_config.json",)), "preprocessor_config.json"),
    (lambda p: (make_ready_model_dir(p) / "adapter_config.json").write_text("{}") and p, "LoRA adapter"),
    (lambda p: p / "absent", "no such folder"),
])
def test_checkpoint_push_refuses_a_folder_that_is_not_inference_ready(tmp_path, setup, fragment):
    folder = setup(tmp_path / "m")
    assert_one_line_error(run_make(tmp_path, "flexai-checkpoint-push", f"MERGED={folder}"), fragment)


@pytest.mark.parametrize("target, call", [
    ("flexai-serve", ["inference", "serve", "vlm-grpo-training-endpoint", "--checkpoint", "vlm-grpo-training-merged"]),
    ("flexai-endpoint", ["inference", "inspect", "vlm-grpo-training-endpoint"]),
])
def test_serve_and_endpoint_say_how_to_call_it(tmp_path, target, call):
    run = run_make(tmp_path, target)
    assert only_flexai_call(run) == call
    lines = [line.strip() for line in run.stdout.splitlines()]
    infer = next(line for line in lines if line.startswith("make infer"))
    assert shlex.split(infer)[2].startswith("INFER_ARGS=--endpoint $ENDPOINT_URL --image ")
    assert any(line.startswith("curl ") and "$FLEXAI_API_KEY" in line for line in lines)
    python = next(line for line in lines if line.startswith("python -c"))
    compile(shlex.split(python)[2], "<printed>", "exec")  # the printed client line is valid Python


def test_serve_knobs(tmp_path):
    assert only_flexai_call(run_make(tmp_path, "flexai-serve", "ENDPOINT=ep", "CKPT_NAME=ck")) == \
        ["inference", "serve", "ep", "--checkpoint", "ck"]
    assert only_flexai_call(run_make(tmp_path / "e", "flexai-endpoint", "ENDPOINT=ep")) == ["inference", "inspect", "ep"]


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


def test_wandb_key_from_the_environment_is_never_printed_or_passed(tmp_path):
    token = "wk_EnvWandbKeyMustStayHidden"
    for target in ("info", "flexai-train", "flexai-serve"):
        run = run_make(tmp_path / target, target, "WANDB_SECRET=wandb-key", env_extra={"WANDB_API_KEY": token})
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
    info = run_make(tmp_path / "info", "info", "ACCELS=4", "SECRET=<x>")
    header, printed = info.stdout.splitlines()[:2]  # the job's command comes first
    assert header == "make flexai-train runs:"
    train = run_make(tmp_path / "train", "flexai-train", "ACCELS=4", "SECRET=<x>")
    assert shlex.split(printed)[1:] == only_flexai_call(train)


def help_groups(text: str) -> dict[str, list[str]]:
    """`make help`'s target lines by group heading (a line ending in `:` before them)."""
    groups, current = {}, None
    for line in text.split("Knobs (default", 1)[0].splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = groups.setdefault(line[:-1], [])
        elif line.startswith("  ") and current is not None:
            current.append(line.split()[0])
    return groups


def test_help_groups_the_targets_by_stage_and_marks_the_paid_ones(tmp_path):
    run = run_make(tmp_path, "help")
    groups = help_groups(run.stdout)
    heads = [g.split(" (")[0].split(":")[0] for g in groups]
    assert heads == ["Start here", "Local, free", "FlexAI training", "After training", "Serving on FlexAI", "Benchmarks",
                     "Docker"], heads
    by_target = {t: g for g, targets in groups.items() for t in targets}
    assert by_target["merge"].startswith("After training") and by_target["flexai-serve-delete"].startswith("Serving")
    assert by_target["dry-run"].startswith("Local, free") and by_target["flexai-stop"].startswith("FlexAI training")
    paid = {line.split()[0] for line in run.stdout.splitlines() if line.startswith("  ") and "[paid]" in line}
    # exactly the targets whose recipe starts a FlexAI job or endpoint (`training run`, `inference serve`)
    assert paid == {"flexai-train", "flexai-resume", "flexai-bench", "flexai-serve"}


def test_info_says_which_code_the_job_runs(tmp_path):
    run = run_make(tmp_path, "info", "REPO_URL=https://github.com/me/fork", "REVISION=my-branch")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    i = lines.index("Code the job runs: FlexAI clones REPO_URL at REVISION, not this working copy:")
    assert lines[i + 1] == "  https://github.com/me/fork at my-branch"


def test_dry_run_is_the_jobs_entry_with_dry_run_here(tmp_path):
    """`make dry-run` runs make flexai-train's entry (knobs applied) with the venv's accelerate and --dry_run; DIR
    stands in for the FlexAI dataset mount."""
    train = entry(only_flexai_call(run_make(tmp_path / "t", "flexai-train", "ACCELS=4", "DATASET=d")))
    run = run_make(tmp_path / "d", "-n", "-o", ".venv/.installed", "dry-run", "ACCELS=4", "DATASET=d", "DIR=my data/",
                   tools=())
    assert run.returncode == 0, run.stderr
    (line,) = [line for line in run.stdout.splitlines() if "grpo_vlm.py" in line]
    assert line.startswith(f"PATH={REPO}/.venv/bin:")
    argv = shlex.split(line.split(" ", 1)[1])
    assert argv == [*train, "--dry_run", "--dataset_name", "my data/"]
    assert_one_line_error(run_make(tmp_path / "n", "dry-run", "NODES=2", tools=()), "NODES=2", "NODES=1 ACCELS=N")


# ---- the code a job runs: REPO_URL at REVISION, not the working copy --------------------------------------------------


def git(repo: Path, *args: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(repo.parent), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return _proc.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.fixture
def clone(tmp_path) -> Path:
    """A git checkout holding the Makefile, with remote `origin` = https://github.com/me/fork whose `main` (as last
    fetched) is the checkout's HEAD: a working copy the job's REPO_URL at REVISION contains."""
    repo = tmp_path / "clone"
    (repo / "code" / "vlm-grpo").mkdir(parents=True)
    shutil.copy(MAKEFILE, repo / "Makefile")
    shutil.copy(REPO / "code" / "vlm-grpo" / "deepspeed_zero3.yaml", repo / "code" / "vlm-grpo")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    git(repo, "remote", "add", "origin", "git@github.com:me/fork.git")
    git(repo, "update-ref", "refs/remotes/origin/main", "HEAD")
    git(repo, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/main")
    return repo


def train_in(repo: Path, tmp: Path, *knobs: str) -> subprocess.CompletedProcess:
    bin_dir = make_stub_dir(tmp)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp), "STUB_CALLS": str(tmp / "calls")}
    return _proc.run(["make", "--no-print-directory", "flexai-train", *knobs], cwd=repo, env=env,
                     capture_output=True, text=True, timeout=120)


FORK = "REPO_URL=https://github.com/me/fork"


def test_no_warning_when_the_revision_holds_the_working_copy(clone, tmp_path):
    for knobs in ((FORK,), (FORK, "REVISION=main"), (FORK + ".git/", "REVISION=main")):
        run = train_in(clone, tmp_path, *knobs)
        assert run.returncode == 0 and run.stderr == "", (knobs, run.stderr)


@pytest.mark.parametrize("change, knobs, says", [
    (lambda repo: (repo / "my_reward.py").write_text("x = 1\n"), (FORK,), "1 uncommitted or untracked file(s)"),
    (lambda repo: git(repo, "commit", "-q", "--allow-empty", "-m", "local"), (FORK,), "is not in origin/main"),
    (lambda repo: git(repo, "checkout", "-qb", "mine"), (FORK, "REVISION=mine"), "branch mine is not on origin"),
    (lambda repo: [git(repo, *a) for a in (("commit", "-q", "--allow-empty", "-m", "x"), ("tag", "v2"))],
     (FORK, "REVISION=v2"), "REVISION=v2 is on no branch of origin"),  # a tag of an unpushed commit
    (lambda repo: None, (FORK, "REVISION=nowhere"), "REVISION=nowhere is neither a branch of origin"),
    (lambda repo: None, (), "no remote of it is REPO_URL"),  # the default: the seed's upstream repository
])
def test_the_job_warns_when_its_revision_cannot_hold_the_working_copy(clone, tmp_path, change, knobs, says):
    change(clone)
    run = train_in(clone, tmp_path, *knobs)
    assert run.returncode == 0, run.stderr  # a warning: the job still starts
    (line,) = run.stderr.splitlines()
    assert line.startswith("warning: the job runs ") and "not this working copy" in line and says in line, line
    assert len(list((tmp_path / "calls").glob("*.argv"))) == 1


# ---- README.md's quickstart commands ------------------------------------------------------------------------------


def readme_make_commands() -> list[list[str]]:
    section = (REPO / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [c for b in shell_blocks(section) for c in block_commands(b) if c[0] == "make"]


def test_readme_flexai_commands_run_as_written(tmp_path):
    commands = readme_make_commands()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):.*## ", MAKEFILE.read_text(), re.M))
    assert {"smoke", "test", "flexai-connect", "flexai-secret", "info", "flexai-train", "flexai-logs"} <= \
        {c[1] for c in commands}
    for i, argv in enumerate(commands):
        target, knobs = argv[1], [a for a in argv[2:] if "=" in a]
        assert target in targets and {k.split("=", 1)[0] for k in knobs} <= set(knob_names()), argv
        if target.startswith("flexai-"):
            run = run_make_with_local_inputs(tmp_path / str(i), target, *knobs, stdin="hf_placeholder_value\n")
            assert run.returncode == 0 and len(run.argv("flexai")) == 1, (argv, run.stderr)
        else:
            assert run_make(tmp_path / str(i), "-n", target, *knobs, tools=()).returncode == 0, argv


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
    proc = _proc.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("target", ["smoke", "test", "vllm-cpu"])
def test_set_up_builds_and_installs_vllm_for_cpu(tmp_path, target):
    out = dry_make(target, f"VENV={tmp_path}/venv", "HOME=/home/u", "XDG_CACHE_HOME=")
    build = [line for line in out.splitlines() if "scripts/build_vllm_cpu.py" in line]
    assert len(build) == 1, out
    # the project's pins and vLLM's runtime pins in one resolver call: torch stays the pinned 2.8.0
    assert build[0].endswith("--install code/vlm-grpo/requirements-dev.txt code/vlm-grpo/requirements-vllm-cpu.txt")
    # a per-user cache keyed by vLLM and torch (not .whl/, which holds other wheels): fresh clones reuse the build
    assert "--wheel-dir /home/u/.cache/vlm-grpo/vllm-0.11.0-cpu-torch-2.8.0 " in build[0]
    # --compile-bytecode: uv writes no .pyc by default, and under PYTHONDONTWRITEBYTECODE=1 every process then compiled
    # the whole stack again (a fresh-clone suite took 2528 s instead of about 1400 s)
    install = "-m uv pip install --compile-bytecode -r code/vlm-grpo/requirements-dev.txt"
    assert out.index("-m pip install -q uv==0.13.9") < out.index(install)
    assert out.index(install) < out.index("scripts/build_vllm_cpu.py")


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
