"""code/vlm-grpo/grpo_vlm.py arguments: the seed command parsed token for token, FlexAI's folders, the refusals of
validate_args, and the vision-token ban (fix ledger M5, U3, U4, U5, U6, U8)."""

from __future__ import annotations

import sys
import types

import pytest
from flexai_stub import SEED_ARGV

import grpo_vlm
from grpo_vlm import (
    ConfigError,
    VLMGRPOScriptArguments,
    normalize_target_modules,
    parse_args,
    resolve_args,
    validate_args,
    vision_token_ban,
)
from resume import find_resume_checkpoint

SCRIPT = "code/vlm-grpo/grpo_vlm.py"
# The seed's grpo_vlm.py arguments: everything after the script in its `accelerate launch` line.
SEED_SCRIPT_ARGV = SEED_ARGV[SEED_ARGV.index(SCRIPT) + 1 :]

# A parse that reaches validate_args' own checks offline: no vLLM, a small model name (nothing is loaded).
BASE = ["--model_name_or_path", "tiny", "--output_dir", "unused-out"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No FlexAI or accelerate variables from the caller's shell: each test sets what it needs."""
    for var in (
        "FLEXAI_OUTPUT_CHECKPOINT_DIR",
        "FLEXAI_INPUT_CHECKPOINT_DIR",
        "ACCELERATE_USE_DEEPSPEED",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
    ):
        monkeypatch.delenv(var, raising=False)


def test_seed_argv_is_the_seed_recipes_command(repo_root):
    """flexai_stub.SEED_ARGV's script arguments stay those of the seed recipe as experiments/vlm-grpo/INTERNALS.md
    quotes it."""
    import shlex

    text = (repo_root / "experiments" / "vlm-grpo" / "INTERNALS.md").read_text()
    command = text[text.index("flexai training run") : text.index("```", text.index("flexai training run"))]
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[argv.index(SCRIPT) + 1 :] == SEED_SCRIPT_ARGV


def test_seed_command_parses_token_for_token():
    script_args, training_args, model_args = parse_args(SEED_SCRIPT_ARGV)
    assert isinstance(script_args, VLMGRPOScriptArguments)
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert training_args.output_dir == "/output-checkpoint/grpo-Qwen2.5-VL-3B-Instruct"
    assert training_args.learning_rate == 1e-5
    assert training_args.gradient_checkpointing is True
    assert model_args.dtype == "bfloat16"
    assert script_args.max_prompt_length == 2048  # TRL 1.2 dropped it (U1): the script owns it now
    assert training_args.max_completion_length == 1024
    assert training_args.use_vllm is True
    assert training_args.vllm_mode == "colocate"
    assert model_args.use_peft is True
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert training_args.log_completions is True
    assert training_args.logging_steps == 200
    # defaults the seed relies on
    assert script_args.dataset_name == "lmms-lab/multimodal-open-r1-8k-verified"
    assert script_args.reward_funcs == ["format", "accuracy"]


# Seed flags that restate TRL 1.2.0's default: they change no field by themselves.
SEED_FLAGS_AT_DEFAULT = {"gradient_checkpointing": True, "vllm_mode": "colocate"}


def test_seed_flags_each_change_something():
    """Every seed flag is consumed by a dataclass field and, but for the ones restating TRL's defaults
    (SEED_FLAGS_AT_DEFAULT), moves it off its default: no flag is silently ignored."""
    defaults, seed = parse_args(BASE), parse_args(SEED_SCRIPT_ARGV)
    flags = [token[2:] for token in SEED_SCRIPT_ARGV if token.startswith("--")]
    for flag in flags:
        owners = [i for i, args in enumerate(seed) if hasattr(args, flag)]
        assert owners, f"--{flag} is no field of the script's argument classes"
        before, after = getattr(defaults[owners[0]], flag), getattr(seed[owners[0]], flag)
        if flag in SEED_FLAGS_AT_DEFAULT:
            assert before == after == SEED_FLAGS_AT_DEFAULT[flag], f"TRL's default for --{flag} changed: {before}"
        elif flag not in ("model_name_or_path", "output_dir"):  # BASE sets those two too
            assert after != before, f"--{flag} left {before!r} unchanged"


def test_seed_checkpointing_gets_the_zero3_mode():
    """What the script adds to the seed's --gradient_checkpointing under ZeRO-3: non-reentrant checkpointing without
    torch's metadata check (zero3.py, fix ledger M1); with checkpointing off it sets no kwargs."""
    from accelerate.utils import DeepSpeedPlugin

    from zero3 import configure_zero3

    for argv, expected in (
        (SEED_SCRIPT_ARGV, {"use_reentrant": False, "determinism_check": "none"}),
        ([*SEED_SCRIPT_ARGV, "--gradient_checkpointing", "false"], None),
    ):
        _, training_args, _ = parse_args(argv)
        assert training_args.gradient_checkpointing_kwargs is None
        training_args.deepspeed_plugin = DeepSpeedPlugin(zero_stage=3)
        # on_gpu with no zero_optimization overrides: configure_zero3 returns before it registers the plugin as the
        # process-wide DeepSpeed config, which would make later tests load models under zero.Init
        configure_zero3(training_args, on_gpu=True)
        assert training_args.gradient_checkpointing_kwargs == expected


def test_missing_reward_dependency_is_refused_before_loading(monkeypatch):
    """The default rewards include accuracy: without math-verify the run stops at validation, not hours in with every
    LaTeX answer scored 0."""
    monkeypatch.setitem(sys.modules, "math_verify", None)  # what `import math_verify` meets without the package
    script_args, training_args, model_args = parse_args(BASE)
    with pytest.raises(ConfigError, match="accuracy needs math_verify"):
        validate_args(script_args, training_args, model_args)


def test_unknown_flag_is_refused():
    with pytest.raises(ConfigError, match="no_such_flag.*--help"):
        parse_args([*BASE, "--no_such_flag", "1"])


@pytest.mark.parametrize(
    "tokens",
    [
        ["q_proj", "v_proj"],  # the seed: "q_proj" "v_proj"
        ["q_proj,", "v_proj"],  # TRL docs: "q_proj", "v_proj" after the shell's quote removal (U3)
        ["q_proj,v_proj"],
        ["q_proj , v_proj", ","],
    ],
)
def test_lora_target_modules_forms_give_both_modules(tokens):
    _, _, model_args = parse_args([*BASE, "--use_peft", "--lora_target_modules", *tokens])
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]


def test_lora_comma_form_from_a_shell_line():
    import shlex

    argv = shlex.split('--model_name_or_path tiny --use_peft --lora_target_modules "q_proj", "v_proj"')
    assert argv[-2:] == ["q_proj,", "v_proj"]  # what the shell hands over: the bug's input
    _, _, model_args = parse_args(argv)
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]


def test_normalize_target_modules_keeps_all_linear_and_none():
    assert normalize_target_modules(None) is None
    assert normalize_target_modules(["all-linear"]) == "all-linear"
    assert normalize_target_modules("q_proj,k_proj") == ["q_proj", "k_proj"]


# ---- FlexAI folders ------------------------------------------------------------------------------------------


def test_flexai_output_dir_is_the_default_output_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXAI_OUTPUT_CHECKPOINT_DIR", str(tmp_path / "flexai-out"))
    _, training_args, _ = parse_args(["--model_name_or_path", "tiny"])
    assert training_args.output_dir == str(tmp_path / "flexai-out")


def test_explicit_output_dir_wins_over_flexai(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXAI_OUTPUT_CHECKPOINT_DIR", str(tmp_path / "flexai-out"))
    _, training_args, _ = parse_args(SEED_SCRIPT_ARGV)
    assert training_args.output_dir == "/output-checkpoint/grpo-Qwen2.5-VL-3B-Instruct"


def _trainer_checkpoint(folder, step=1):
    from test_resume import make_checkpoint  # a whole checkpoint: resume checks every file (checkpoints.py)

    return make_checkpoint(folder, step)


def test_flexai_input_checkpoint_itself(monkeypatch, tmp_path):
    ckpt = _trainer_checkpoint(tmp_path / "input")
    monkeypatch.setenv("FLEXAI_INPUT_CHECKPOINT_DIR", str(ckpt))
    assert find_resume_checkpoint(str(tmp_path / "out")) == str(ckpt)


def test_flexai_input_with_checkpoint_subfolders_picks_the_newest(monkeypatch, tmp_path):
    base = tmp_path / "input"
    for step in (2, 10, 9):  # numeric, not lexical order: 10 is the newest
        _trainer_checkpoint(base / f"checkpoint-{step}", step)
    (base / "checkpoint-99.txt").write_text("a file, not a checkpoint")
    monkeypatch.setenv("FLEXAI_INPUT_CHECKPOINT_DIR", str(base))
    assert find_resume_checkpoint(None) == str(base / "checkpoint-10")


def test_the_newest_step_wins_across_flexai_input_and_output_dir(monkeypatch, tmp_path):
    # Issue 10: the input checkpoint used to win always, so a resumed job that FlexAI restarted rewound.
    newer = _trainer_checkpoint(tmp_path / "out" / "checkpoint-5", 5)
    ckpt = _trainer_checkpoint(tmp_path / "input" / "checkpoint-3", 3)
    monkeypatch.setenv("FLEXAI_INPUT_CHECKPOINT_DIR", str(tmp_path / "input"))
    assert find_resume_checkpoint(str(tmp_path / "out")) == str(newer)
    newer.rename(tmp_path / "out" / "checkpoint-2")
    (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    assert find_resume_checkpoint(str(tmp_path / "out")) == str(ckpt)


def test_empty_flexai_input_falls_back_to_output_dir(monkeypatch, tmp_path):
    (tmp_path / "input").mkdir()
    monkeypatch.setenv("FLEXAI_INPUT_CHECKPOINT_DIR", str(tmp_path / "input"))
    assert find_resume_checkpoint(str(tmp_path / "out")) is None  # nothing anywhere: fresh start
    ckpt = _trainer_checkpoint(tmp_path / "out" / "checkpoint-7", 7)
    assert find_resume_checkpoint(str(tmp_path / "out")) == str(ckpt)


def test_resolve_args_sets_resume_from_flexai_input(monkeypatch, tmp_path):
    ckpt = _trainer_checkpoint(tmp_path / "input" / "checkpoint-4", 4)
    monkeypatch.setenv("FLEXAI_INPUT_CHECKPOINT_DIR", str(tmp_path / "input"))
    monkeypatch.setenv("FLEXAI_OUTPUT_CHECKPOINT_DIR", str(tmp_path / "output"))
    args = parse_args(["--model_name_or_path", "tiny"])
    resolve_args(*args)
    assert args[1].resume_from_checkpoint == str(ckpt)
    assert args[1].output_dir == str(tmp_path / "output")


def test_explicit_resume_from_checkpoint_wins(monkeypatch, tmp_path):
    _trainer_checkpoint(tmp_path / "input" / "checkpoint-4")
    mine = _trainer_checkpoint(tmp_path / "mine")
    monkeypatch.setenv("FLEXAI_INPUT_CHECKPOINT_DIR", str(tmp_path / "input"))
    args = parse_args([*BASE, "--resume_from_checkpoint", str(mine)])
    resolve_args(*args)
    assert args[1].resume_from_checkpoint == str(mine)


def test_resolve_args_sizes_vllm_context_to_prompt_plus_completion():
    args = parse_args(SEED_SCRIPT_ARGV)
    resolve_args(*args)
    assert args[1].vllm_max_model_length == 2048 + 1024
    assert args[1].model_init_kwargs["dtype"] == "bfloat16"


# ---- validate_args refusals ------------------------------------------------------------------------------------


def _validate(argv):
    validate_args(*parse_args(argv))


def test_defaults_pass_validation():
    _validate([*BASE, "--use_peft", "--lora_target_modules", "q_proj", "v_proj"])


def test_vllm_sleep_mode_is_refused():
    with pytest.raises(ConfigError, match=r"trl#5312"):
        _validate([*BASE, "--use_vllm", "--vllm_enable_sleep_mode"])


@pytest.fixture
def no_vllm(monkeypatch):
    """A machine without vLLM: `import vllm` raises ImportError (None in sys.modules does that)."""
    monkeypatch.setitem(sys.modules, "vllm", None)


def test_use_vllm_without_vllm_is_refused(no_vllm):
    with pytest.raises(ConfigError, match=r"needs vLLM.*pytorch-28-vllm-0110-nvidia.*make vllm-cpu"):
        _validate(SEED_SCRIPT_ARGV)


def test_dry_run_of_the_seed_command_without_vllm_warns_and_goes_on(no_vllm, caplog):
    with caplog.at_level("WARNING", logger="grpo_vlm"):
        _validate([*SEED_SCRIPT_ARGV, "--dry_run"])
    assert "needs vLLM, which is not importable here" in caplog.text and "dry run checks everything else" in caplog.text


@pytest.fixture
def importable_vllm(monkeypatch):
    """An importable (empty) `vllm` module, to reach the checks that only matter once vLLM is present."""
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))


def test_long_prompts_with_vllm_are_refused(importable_vllm):
    with pytest.raises(ConfigError, match=r"4096.*trl#3788"):
        _validate([*BASE, "--use_vllm", "--max_prompt_length", "4097"])
    _validate([*BASE, "--use_vllm", "--max_prompt_length", "4096"])  # the limit itself is fine


def test_long_prompts_without_vllm_are_fine():
    _validate([*BASE, "--max_prompt_length", "8192"])


def test_unknown_reward_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError) as err:
        _validate([*BASE, "--reward_funcs", "format", "acuracy"])
    assert "acuracy" in str(err.value) and "accuracy" in str(err.value) and "format" in str(err.value)


@pytest.mark.parametrize("value, refused", [("false", True), ("true", False)])
def test_zero3_without_16bit_save_is_refused(monkeypatch, value, refused):
    args = parse_args([*BASE, "--use_peft"])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", value)
    if refused:
        with pytest.raises(ConfigError, match=r"zero3_save_16bit_model.*trl#4416"):
            validate_args(*args)
    else:
        validate_args(*args)


def test_zero2_without_16bit_save_is_fine(monkeypatch):
    args = parse_args([*BASE, "--use_peft"])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false")
    validate_args(*args)


@pytest.mark.parametrize("fraction", ["-0.1", "1", "1.5"])
def test_bad_eval_fraction_is_refused(fraction):
    with pytest.raises(ConfigError, match="eval_fraction"):
        _validate([*BASE, "--eval_fraction", fraction])


@pytest.mark.parametrize(
    "flags",
    [
        ["--per_device_train_batch_size", "3", "--num_generations", "2"],
        ["--per_device_train_batch_size", "4"],  # num_generations defaults to 8
        ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3", "--num_generations", "4"],
    ],
)
def test_batch_not_divisible_by_num_generations_is_a_clear_error(flags):
    with pytest.raises(ConfigError) as err:
        parse_args([*BASE, *flags])
    message = str(err.value)
    assert "num_generations" in message
    assert "per_device_train_batch_size counts completions" in message


@pytest.mark.parametrize(
    "flags", [["--per_device_train_batch_size", "4", "--num_generations", "4"], ["--per_device_train_batch_size", "8"]]
)
def test_divisible_batches_parse(flags):
    _, training_args, _ = parse_args([*BASE, *flags])
    assert training_args.generation_batch_size % training_args.num_generations == 0


# ---- vision tokens can never be generated (M5) -----------------------------------------------------------------

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def test_vision_token_ban_for_transformers(processor):
    tok = processor.tokenizer
    kwargs = vision_token_ban(tok, use_vllm=False)
    assert set(kwargs) == {"suppress_tokens"}
    assert sorted(kwargs["suppress_tokens"]) == sorted(tok.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    assert tok.unk_token_id not in kwargs["suppress_tokens"] or tok.unk_token_id is None


def test_vision_token_ban_for_vllm(processor):
    kwargs = vision_token_ban(processor.tokenizer, use_vllm=True)
    assert kwargs == {"bad_words": VISION_TOKENS}


def test_resolve_args_puts_the_ban_in_generation_kwargs(processor):
    args = parse_args(BASE)
    args[1].generation_kwargs = {"top_k": 5}  # from a --config YAML (the CLI cannot spell a dict)
    resolve_args(*args, processor=processor)
    gen = args[1].generation_kwargs
    assert gen["top_k"] == 5
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") in gen["suppress_tokens"]


def test_user_suppress_tokens_add_to_the_ban(processor):
    args = parse_args(BASE)
    args[1].generation_kwargs = {"suppress_tokens": [7]}
    resolve_args(*args, processor=processor)
    suppressed = args[1].generation_kwargs["suppress_tokens"]
    assert 7 in suppressed and processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") in suppressed


def test_tiny_model_never_generates_image_pad_with_the_ban(tiny_model, processor):
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, Qwen2_5_VLForConditionalGeneration

    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    class FavorImagePad(LogitsProcessor):
        """A policy that wants `<|image_pad|>` above everything else (what a drifting model can do)."""

        def __call__(self, input_ids, scores):
            scores[:, image_pad] += 100.0
            return scores

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "How many red circles are in the image?"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]

    def generate(**extra):
        torch.manual_seed(0)
        out = model.generate(
            **inputs,
            max_new_tokens=8,
            do_sample=True,
            logits_processor=LogitsProcessorList([FavorImagePad()]),
            eos_token_id=None,
            **extra,
        )
        return out[0, prompt_len:].tolist()

    # control: without the ban the bias wins, so this test can see a leak
    assert image_pad in generate()
    banned = generate(**vision_token_ban(processor.tokenizer, use_vllm=False))
    assert len(banned) == 8
    assert image_pad not in banned
    vision_ids = {processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    assert not vision_ids & set(banned)


def test_lora_on_a_tied_output_head_is_refused_with_vllm(tiny_model, tmp_path):
    """The tiny model ties lm_head to the embeddings, as Qwen2.5-VL-3B does: with vLLM rollouts an adapted head
    would also replace vLLM's input embeddings (measured: the policies drifted apart, the reward collapsed)."""
    from vllm_colocate import check_vllm_lora_targets

    args = [*BASE, "--model_name_or_path", str(tiny_model), "--use_peft", "--use_vllm"]
    _, training_args, model_args = parse_args([*args, "--lora_target_modules", "q_proj", "lm_head"])
    with pytest.raises(ConfigError, match=r"lm_head with --use_vllm: this model ties lm_head to its input embeddings"):
        check_vllm_lora_targets(training_args, model_args)
    for ok in (["q_proj", "v_proj"], ["all-linear"]):  # the seed's targets; PEFT's all-linear leaves lm_head alone
        _, training_args, model_args = parse_args([*args, "--lora_target_modules", *ok])
        check_vllm_lora_targets(training_args, model_args)
    _, training_args, model_args = parse_args([*BASE, "--model_name_or_path", str(tiny_model), "--use_peft",
                                               "--lora_target_modules", "q_proj", "lm_head"])
    check_vllm_lora_targets(training_args, model_args)  # transformers generation scores and samples the same model


def test_lora_on_an_untied_output_head_is_fine_with_vllm(tmp_path):
    import make_tiny_model

    from vllm_colocate import check_vllm_lora_targets

    model = make_tiny_model.build(tmp_path / "untied", preset="tiny-untied")
    _, training_args, model_args = parse_args([*BASE, "--model_name_or_path", str(model), "--use_peft", "--use_vllm",
                                               "--lora_target_modules", "q_proj", "lm_head"])
    check_vllm_lora_targets(training_args, model_args)
