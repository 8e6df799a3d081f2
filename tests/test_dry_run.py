"""`grpo_vlm.py --dry_run` end to end, as a subprocess: the seed's flags on the tiny model and synthetic data print the
plan without loading weights; bad input fails fast with `error: ...`; secrets never reach the output."""

from __future__ import annotations

import json
import secrets
import shutil
import time

import pytest

import _forkserver
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
    fit = plan["fit"]  # the memory check (fit_check.py; its arithmetic: tests/test_fit_check.py)
    assert fit["gpu_memory_gb"] == 80 and fit["processes"] == 1
    assert set(fit["cards"]) == {"1x80GB", "1x141GB", "2x80GB", "2x141GB"}  # the seed's 2 GPUs too
    assert all(card["fits"] for card in fit["cards"].values())
    assert fit["largest_term"] == "CUDA context and NCCL"  # the tiny model weighs next to nothing


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
    from test_resume import make_checkpoint  # whole: resume checks every file of a checkpoint (checkpoints.py)

    ckpt = make_checkpoint(tmp_path / "input" / "checkpoint-12", 12, processes=2)
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
    proc = _fails_fast(run_script, argv, ["no column 'image' (--image_column), 'problem' (--problem_column), 'solution' (--solution_column)",
                        "its columns are ['question', 'answer']"],
                       env={"HF_TOKEN": hf_token})
    assert hf_token not in proc.stdout + proc.stderr


def test_unknown_reward_fails_with_the_valid_names(run_script, weightless_model, tmp_path):
    argv = [*offline_seed_argv(weightless_model, tmp_path / "run"), "--reward_funcs", "format", "acuracy", "--dry_run"]
    _fails_fast(run_script, argv, ["unknown reward function 'acuracy'", "'accuracy'", "'format'"])


@pytest.fixture(scope="module")
def no_vllm_path(tmp_path_factory):
    """A PYTHONPATH entry that makes the interpreter behave as on a laptop without vLLM: its sitecustomize puts None
    in sys.modules["vllm"], so `import vllm` fails and `importlib.util.find_spec("vllm")` (TRL's check) finds nothing."""
    root = tmp_path_factory.mktemp("no-vllm")
    (root / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None\n")
    with _forkserver.serve_env({"PYTHONPATH": str(root)}):  # 3 runs: a server that imported without vLLM, once
        yield root


def test_the_seed_command_without_vllm_fails_before_downloading(run_script, tmp_path, no_vllm_path):
    """The seed command verbatim on a machine without vLLM: refused before the 3B model or dataset is fetched."""
    argv = swap(SEED_SCRIPT_ARGV, output_dir=str(tmp_path / "run"))
    _fails_fast(run_script, argv, ["--use_vllm needs vLLM"],
                env={"FLEXAI_INPUT_CHECKPOINT_DIR": None, "PYTHONPATH": str(no_vllm_path)})


def test_indivisible_batch_fails_with_a_clear_error(run_script, weightless_model, tmp_path):
    argv = [*offline_seed_argv(weightless_model, tmp_path / "run"), "--per_device_train_batch_size", "6", "--dry_run"]
    _fails_fast(run_script, argv, ["must be divisible by num_generations (8)", "counts completions, not prompts"])


def test_unknown_image_policy_in_a_config_file_fails_with_a_clear_error(run_script, weightless_model, tmp_path):
    # argparse checks `choices` on the command line only; a --config YAML value must be refused too
    config = tmp_path / "run.yaml"
    config.write_text("image_policy: shrink\n")
    argv = [*offline_seed_argv(weightless_model, tmp_path / "run"), "--config", str(config), "--dry_run"]
    _fails_fast(run_script, argv, ["--image_policy must be one of ['downscale', 'drop'], got 'shrink'"])


def test_negative_max_image_side_fails_with_a_clear_error(run_script, weightless_model, tmp_path):
    argv = [*offline_seed_argv(weightless_model, tmp_path / "run"), "--max_image_side", "-1", "--dry_run"]
    _fails_fast(run_script, argv, ["--max_image_side must be >= 0 (0: no limit), got -1"])


# ---- the data survey: every row, from its image header ---------------------------------------------------------------


def _encoded(size, fmt="PNG") -> dict:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, fmt)
    return {"bytes": buf.getvalue(), "path": None}


# The fixture's readable images (width, height), and by hand for the tiny processor (patch 14 x merge 2 = 28 px per
# token side, min_pixels 3136, max_pixels 200704), what Qwen2.5-VL's resize makes of them, as stored and downscaled
# to --max_image_side 256 (longer side 256, shorter side scaled by the same factor: exact here):
#   56x56      -> 56x56 = 2x2 = 4 tokens;                       fits
#   1024x768   -> over max_pixels, scaled to 504x364 = 18x13 = 234; downscaled 256x192 -> 252x196 = 9x7  = 63
#   600x1200   -> over max_pixels, scaled to 308x616 = 11x22 = 242; downscaled 128x256 -> 140x252 = 5x9  = 45
#   224x168    -> 224x168 = 8x6 = 48 tokens;                    fits
SURVEY_SIZES = [(56, 56), (1024, 768), (600, 1200), (224, 168)]
SURVEY_STORED = [(56, 56), (256, 192), (128, 256), (224, 168)]


def test_dry_run_surveys_every_row_under_each_image_policy(run_script, weightless_model, processor, tmp_path):
    import datasets
    from PIL import Image
    from trl.data_utils import prepare_multimodal_messages

    from data import make_prompt
    from rewards import SYSTEM_PROMPT

    def processor_prompt_length(image) -> int:
        """The prompt length GRPOTrainer gets: the processor expands the image into its tokens."""
        messages = prepare_multimodal_messages(make_prompt(problem, SYSTEM_PROMPT), images=[image])
        ids = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"][0]
        return len(ids)

    problem = "How many red circles are in the image?"
    rows = [_encoded(SURVEY_SIZES[0]), _encoded(SURVEY_SIZES[1], "JPEG"), _encoded(SURVEY_SIZES[2]),
            _encoded(SURVEY_SIZES[3]), {"bytes": b"not an image", "path": None}, _encoded((56, 56))]
    parquet = tmp_path / "survey.parquet"
    datasets.Dataset.from_dict(
        {"image": rows, "problem": [problem] * 5 + [" "], "solution": ["<think>x</think>\n\n<answer>3</answer>"] * 6},
        features=datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                    "solution": datasets.Value("string")}),
    ).to_parquet(str(parquet))
    # Prompt lengths as the trainer's processor counts them, image expanded, at each stored size
    length = {size: processor_prompt_length(Image.new("RGB", size))
              for size in SURVEY_SIZES + SURVEY_STORED}
    limit = length[(256, 192)] - 1  # drops the 63-token downscaled image, keeps the 48-token one
    assert length[(224, 168)] <= limit

    argv = [*offline_seed_argv(weightless_model, tmp_path / "run"), "--max_image_side", "256", "--eval_fraction", "0",
            "--dry_run"]
    argv = swap(argv, dataset_name=str(parquet), max_prompt_length=str(limit))
    proc = run_script(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = plan_of(proc.stdout)
    data = plan["data"]
    assert data["rows"] == 6 and data["image_policy"] == "downscale"
    assert data["max_image_side"] == 256 and data["max_prompt_length"] == limit
    assert data["unusable"] == {"empty problem or solution": 1, "undecodable image": 1}
    # nearest-rank percentiles of 4 values v1 <= v2 <= v3 <= v4: min, p10 = v1; p50 = v2; p90, p99, max = v4
    assert data["image_width"] == {"min": 56, "p10": 56, "p50": 224, "p90": 1024, "p99": 1024, "max": 1024}
    assert data["image_height"] == {"min": 56, "p10": 56, "p50": 168, "p90": 1200, "p99": 1200, "max": 1200}
    assert data["image_longer_side"] == {"min": 56, "p10": 56, "p50": 224, "p90": 1200, "p99": 1200, "max": 1200}
    assert data["over_max_image_side"] == 2
    assert data["image_tokens"]["original"] == {"min": 4, "p10": 4, "p50": 48, "p90": 242, "p99": 242, "max": 242}
    assert data["image_tokens"]["downscale"] == {"min": 4, "p10": 4, "p50": 45, "p90": 63, "p99": 63, "max": 63}
    # downscale keeps the 4 readable rows' prompts, sorted by their image tokens: 4, 45, 48, 63
    by_tokens = [length[(56, 56)], length[(128, 256)], length[(224, 168)], length[(256, 192)]]
    assert by_tokens == sorted(by_tokens)
    assert data["prompt_tokens"]["downscale"] == {"min": by_tokens[0], "p10": by_tokens[0], "p50": by_tokens[1],
                                                  "p90": by_tokens[3], "p99": by_tokens[3], "max": by_tokens[3]}
    # drop keeps the two images within 256 px: 56x56 and 224x168
    drop = [length[(56, 56)], length[(224, 168)]]
    assert data["prompt_tokens"]["drop"] == {"min": drop[0], "p10": drop[0], "p50": drop[0], "p90": drop[1],
                                             "p99": drop[1], "max": drop[1]}
    assert data["over_max_prompt_length"] == {"downscale": 1, "drop": 0}
    assert data["kept"] == {"downscale": 3, "drop": 2}
    assert plan["train_rows"] == 3  # the default policy's rows, nothing held out (--eval_fraction 0)
    # the rows prepared for real (all 6 here: the first 32) agree with the survey
    assert plan["checked_rows"] == (
        "kept 3/6 rows, 1 downscaled to max_image_side=256 (dropped: 1 empty problem or solution, "
        f"1 prompt > max_prompt_length={limit} tokens, 1 undecodable image)"
    )


# ---- the seed command as FlexAI runs it: --use_vllm --vllm_mode colocate --------------------------------------------


def test_dry_run_checks_the_vllm_command_on_a_machine_without_vllm(run_script, weightless_model, tmp_path,
                                                                   no_vllm_path):
    argv = [*offline_seed_script_args(weightless_model, tmp_path / "run", vllm=True), "--synthetic_rows", "16",
            "--dry_run"]
    proc = run_script(argv, env={"PYTHONPATH": str(no_vllm_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--use_vllm needs vLLM, which is not importable here" in proc.stderr
    plan = plan_of(proc.stdout)
    assert plan["generation"] == "vLLM colocate"
    vllm = plan["vllm"]
    assert vllm["installed"] is False
    assert vllm["max_model_len"] == 2048 + 1024  # --max_prompt_length + --max_completion_length
    assert vllm["model_context"] == 4096  # the tiny model's max_position_embeddings (scripts/make_tiny_model.py)
    assert vllm["max_num_batched_tokens"] == 4096
    assert vllm["longest_prompt"] == plan["data"]["prompt_tokens"]["downscale"]["max"] <= 2048
    assert plan["fit"]["terms_gib"]["vLLM's pool"] == 24.0  # TRL's 0.3 of the default --gpu_memory_gb 80
    assert plan["checked_rows"] == "kept 16/16 rows (dropped: none)"


def test_dry_run_refuses_a_vllm_context_longer_than_the_models(run_script, weightless_model, tmp_path, no_vllm_path):
    argv = [*offline_seed_script_args(weightless_model, tmp_path / "run", vllm=True), "--synthetic_rows", "16",
            "--max_completion_length", "3000", "--dry_run"]
    proc = run_script(argv, env={"PYTHONPATH": str(no_vllm_path)})
    assert proc.returncode == 1
    assert "error: vLLM's max model length 5048" in proc.stderr and "context of 4096 tokens" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_make_dry_run_checks_the_jobs_own_command_with_its_processes(weightless_model, tmp_path):
    """The guide's check before paying: `make dry-run` runs make flexai-train's entry here under `accelerate launch`
    with the job's 2 processes (the seed's flags; the tiny model and 16 synthetic rows swapped in through the knobs),
    and each process prints the plan of the 2-process job, with the job's own --output_dir (/output-checkpoint/...,
    which a dry run does not write)."""
    import os
    import sys
    from pathlib import Path

    import _proc
    from _tiny import REPO

    venv = Path(sys.executable).parent.parent  # the venv running the tests: the one `make` must use
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"))
    cmd = ["make", "--no-print-directory", "-o", f"{venv}/.installed", f"VENV={venv}", "dry-run",
           f"MODEL={weightless_model}", "ARGS=--dataset_name synthetic --synthetic_rows 16"]
    # about 80 s alone on 2 cores; far more when they are shared
    proc = _proc.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stderr[-3000:]
    plans = [plan_of(part) for part in stdout.split("dry run plan: ")[1:] for part in ["dry run plan: " + part]]
    assert len(plans) == 2  # one per process of the job
    for plan in plans:
        assert plan["processes"] == 2
        assert plan["completions_per_step"] == 16 and plan["prompts_per_step"] == 2  # 8 per process, groups of 8
        assert plan["train_rows"] == 15 and plan["steps"] == 23  # ceil(3 epochs x 15 prompts / 2 per step)
        assert plan["generation"] == "vLLM colocate"
        assert plan["output_dir"] == "/output-checkpoint/grpo-tiny"
        assert set(plan["fit"]["cards"]) == {"2x80GB", "2x141GB"}  # the job's 2 GPUs on both cards (fit_check.py)
    assert not Path("/output-checkpoint/grpo-tiny").exists()  # a dry run writes nothing


def test_a_reward_file_returning_the_wrong_number_of_scores_fails_the_dry_run(run_script, weightless_model, tmp_path):
    """The reward is imported and called once on a dummy completion of the first row (issue 19), in one line."""
    reward = tmp_path / "my_reward.py"
    reward.write_text("def pairs(completions, **kwargs):\n    return [0.0, 1.0]\n")
    argv = [*offline_seed_argv(weightless_model, tmp_path / "run"), "--reward_funcs", "format", f"{reward}:pairs",
            "--dry_run"]
    _fails_fast(run_script, argv, [f"error: --reward_funcs {reward}:pairs: returned 2 scores for 1 completion"])
