"""`grpo_vlm.py --dry_run` end to end, as a subprocess: the seed's flags on the tiny model and synthetic data print the
plan without loading weights; bad input fails fast with `error: ...`; secrets never reach the output."""

from __future__ import annotations

import json
import secrets
import shutil
import time

import pytest
from flexai_stub import SEED_ARGV, offline_seed_script_args

SCRIPT = "code/vlm-grpo/grpo_vlm.py"
SEED_SCRIPT_ARGV = SEED_ARGV[SEED_ARGV.index(SCRIPT) + 1 :]
# A bad-input run must fail before any data or weights: interpreter + imports only (~10 s on 2 busy cores).
FAST_S = 60


def swap(argv: list[str], **values: str) -> list[str]:
    """`argv` with the values of the given flags replaced."""
    out = list(argv)
    for flag, value in values.items():
        out[out.index(f"--{flag}") + 1] = value
    return out


def offline_seed_argv(model_dir, output_dir) -> list[str]:
    """The offline seed arguments (flexai_stub.offline_seed_script_args) on a 16-row synthetic dataset."""
    return [*offline_seed_script_args(model_dir, output_dir), "--synthetic_rows", "16"]


def plan_of(stdout: str) -> dict:
    marker = "dry run plan: "
    assert marker in stdout, stdout[-2000:]
    plan, _ = json.JSONDecoder().raw_decode(stdout[stdout.index(marker) + len(marker) :])
    return plan


@pytest.fixture(scope="module")
def weightless_model(tiny_model, tmp_path_factory):
    """A copy of the tiny model without its weights file: a dry run that tried to load weights would fail."""
    copy = tmp_path_factory.mktemp("weightless") / "tiny"
    shutil.copytree(tiny_model, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(copy.glob("*.safetensors"))
    return copy


@pytest.fixture(scope="module")
def hf_token() -> str:
    return "hf_" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def seed_dry_run(run_script, weightless_model, tmp_path_factory, hf_token):
    out = tmp_path_factory.mktemp("dry-run-out")
    argv = offline_seed_argv(weightless_model, out / "run")
    argv += ["--per_device_train_batch_size", "8", "--num_generations", "4", "--num_train_epochs", "1", "--dry_run"]
    return run_script(argv, env={"HF_TOKEN": hf_token}), out


def test_dry_run_with_the_seed_flags_prints_the_plan(seed_dry_run):
    proc, out = seed_dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = plan_of(proc.stdout)
    assert plan["processes"] == 1  # no `accelerate launch` here
    assert plan["num_generations"] == 4
    assert plan["completions_per_step"] == 8  # per_device_train_batch_size counts completions (U8)
    assert plan["prompts_per_step"] == 2
    assert plan["train_rows"] == 15  # 16 rows, one held out for evaluation (--eval_fraction 0.02, at least 1)
    assert plan["steps"] == 8  # ceil(1 epoch x 15 prompts / 2 prompts per step)
    assert plan["max_completion_length"] == 1024
    assert plan["lora_target_modules"] == ["q_proj", "v_proj"]
    assert plan["generation"] == "transformers"
    assert plan["checked_rows"] == "kept 16/16 rows (dropped: none)"
    assert plan["output_dir"] == str(out / "run")
    assert plan["resume_from_checkpoint"] is None
    assert not (out / "run").exists()  # a dry run writes nothing


def test_dry_run_loads_no_weights(seed_dry_run, weightless_model):
    proc, _ = seed_dry_run
    # the fixture ran on a model folder without model.safetensors: success proves no weights were read
    assert not list(weightless_model.glob("*.safetensors"))
    assert proc.returncode == 0
    assert "Loading checkpoint shards" not in proc.stderr


def test_dry_run_never_prints_the_hf_token(seed_dry_run, hf_token):
    proc, _ = seed_dry_run
    assert hf_token not in proc.stdout and hf_token not in proc.stderr
    assert hf_token[3:] not in proc.stdout + proc.stderr  # not even without its prefix


def test_dry_run_resumes_from_the_flexai_input_checkpoint(run_script, weightless_model, tmp_path):
    ckpt = tmp_path / "input" / "checkpoint-12"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 12}')
    argv = [*offline_seed_argv(weightless_model, tmp_path / "run"), "--max_steps", "3", "--dry_run"]
    proc = run_script(argv, env={"FLEXAI_INPUT_CHECKPOINT_DIR": tmp_path / "input"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = plan_of(proc.stdout)
    assert plan["resume_from_checkpoint"] == str(ckpt)
    assert plan["steps"] == 3


# ---- bad input: `error: ...`, non-zero, before any data or weights --------------------------------------------------


def _fails_fast(run_script, argv, expected, env=None):
    start = time.monotonic()
    proc = run_script(argv, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "error: " in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # one clear line, not a stack
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]
    assert elapsed < FAST_S
    return proc


def test_missing_columns_fail_with_a_clear_error(run_script, weightless_model, tmp_path, hf_token):
    import datasets

    parquet = tmp_path / "mine.parquet"
    datasets.Dataset.from_dict({"question": ["How many?"], "answer": ["3"]}).to_parquet(str(parquet))
    argv = [*offline_seed_argv(weightless_model, tmp_path / "run"), "--dry_run"]
    argv = swap(argv, dataset_name=str(parquet))
    proc = _fails_fast(run_script, argv, ["missing column(s) ['image', 'problem', 'solution']", "question"],
                       env={"HF_TOKEN": hf_token})
    assert hf_token not in proc.stdout + proc.stderr


def test_unknown_reward_fails_with_the_valid_names(run_script, weightless_model, tmp_path):
    argv = [*offline_seed_argv(weightless_model, tmp_path / "run"), "--reward_funcs", "format", "acuracy", "--dry_run"]
    _fails_fast(run_script, argv, ["unknown reward function(s) ['acuracy']", "'accuracy'", "'format'"])


def test_the_seed_command_without_vllm_fails_before_downloading(run_script, tmp_path):
    """The seed command verbatim on a machine without vLLM: refused before the 3B model or dataset is fetched."""
    argv = swap(SEED_SCRIPT_ARGV, output_dir=str(tmp_path / "run"))
    _fails_fast(run_script, argv, ["--use_vllm needs vLLM"], env={"FLEXAI_INPUT_CHECKPOINT_DIR": None})


def test_indivisible_batch_fails_with_a_clear_error(run_script, weightless_model, tmp_path):
    argv = [*offline_seed_argv(weightless_model, tmp_path / "run"), "--per_device_train_batch_size", "6", "--dry_run"]
    _fails_fast(run_script, argv, ["must be divisible by num_generations (8)", "counts completions, not prompts"])
