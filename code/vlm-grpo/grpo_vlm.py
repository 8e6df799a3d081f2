"""GRPO + LoRA fine-tuning of Qwen2.5-VL with TRL's GRPOTrainer, vLLM (colocate) and DeepSpeed ZeRO-3.

`--model_name_or_path` also takes Qwen2-VL and Qwen3-VL (dense) checkpoints: what differs between the families (image
tokens per pixel, special token ids, tied head) is read from the checkpoint (families.py); `make_tiny_model.py --family`
builds an offline tiny model of each.

The seed recipe (2 GPUs, FlexAI runtime `pytorch-28-vllm-0110-nvidia`):

    accelerate launch --config_file=code/vlm-grpo/deepspeed_zero3.yaml code/vlm-grpo/grpo_vlm.py \\
        --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct \\
        --output_dir /output-checkpoint/grpo-Qwen2.5-VL-3B-Instruct \\
        --learning_rate 1e-5 --gradient_checkpointing --dtype bfloat16 \\
        --max_prompt_length 2048 --max_completion_length 1024 \\
        --use_vllm --vllm_mode colocate \\
        --use_peft --lora_target_modules "q_proj" "v_proj" \\
        --log_completions --logging_steps 200

Offline, on CPU (what `make smoke` runs; the tiny model comes from scripts/make_tiny_model.py):

    accelerate launch --config_file=code/vlm-grpo/deepspeed_zero3.yaml code/vlm-grpo/grpo_vlm.py \\
        --model_name_or_path outputs/smoke/tiny-qwen2.5-vl --dataset_name synthetic \\
        --output_dir outputs/smoke/run --max_steps 4 \\
        --learning_rate 1e-5 --gradient_checkpointing --dtype bfloat16 \\
        --max_prompt_length 2048 --max_completion_length 1024 \\
        --use_peft --lora_target_modules "q_proj" "v_proj" --log_completions --logging_steps 200

Several nodes (`make flexai-train NODES=2 ACCELS=8`): FlexAI starts the bare script with torchrun on every node, so the
same ZeRO-3 settings come from the DeepSpeed JSON instead of the accelerate yaml (tests/test_multinode.py runs it):

    torchrun --nnodes 2 --nproc_per_node 8 ... code/vlm-grpo/grpo_vlm.py \\
        --deepspeed code/vlm-grpo/deepspeed_zero3.json <the arguments above>

Add `--dry_run` to either to check arguments, data, processor, batch arithmetic and the memory per GPU
(`--gpu_memory_gb`) without loading weights.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Sibling modules (data, rewards, ...) import as top-level modules, whichever directory the script runs from.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser, get_peft_config  # noqa: E402

from adapters import check_adapter_file  # noqa: E402
from checkpoints import RUN_ARGS, GracefulStop, training_signature  # noqa: E402
from config_error import ConfigError  # noqa: E402  (tests and scripts import it from here too)
from data import (  # noqa: E402
    IMAGE_POLICIES,
    SOURCE_INDEX,
    SPLIT_RECORD,
    DatasetError,
    data_columns,
    load_raw_dataset,
    prepare_dataset,
    split_record,
    split_train_eval,
    survey_dataset,
    write_split_record,
)
from fit_check import check_fit  # noqa: E402
from generation import vision_token_ban  # noqa: E402
from path_checks import PathError, check_model_path, check_output_dir, model_load_error, output_dir_problem  # noqa: E402
from resume import RESUME_MODES, resume_point  # noqa: E402
from rewards import REWARD_FUNCS, SYSTEM_PROMPT, RewardError, check_reward_funcs, get_reward_funcs  # noqa: E402
from vision_attention import enable_batched_vision_attention  # noqa: E402
import families  # noqa: E402

import vllm_colocate  # noqa: E402  (as a module: the benchmark's stand-in replaces vllm_importable)

logger = logging.getLogger("grpo_vlm")


# ---- arguments --------------------------------------------------------------------------------------------


@dataclass
class VLMGRPOScriptArguments(ScriptArguments):
    """Data, reward and run options of this script (GRPOConfig and ModelConfig hold the rest)."""

    dataset_name: str = field(
        default="lmms-lab/multimodal-open-r1-8k-verified",
        metadata={
            "help": "Hub id, local path (parquet file/folder, `save_to_disk` folder, jsonl with image paths) or "
            "'synthetic' (built-in offline dataset of generated images with verifiable answers) or 'grounding' "
            "(generated shapes, answers are boxes: use --reward_funcs format iou)."
        },
    )
    image_column: str = field(
        default="image",
        metadata={"help": "Column holding each row's image: an image, a path (jsonl), or a list of them (several "
                          "images a row, one placeholder each, in order)."},
    )
    problem_column: str = field(default="problem", metadata={"help": "Column holding each row's question."})
    solution_column: str = field(
        default="solution",
        metadata={"help": "Column holding each row's gold answer (ideally `<think>...</think><answer>...</answer>`); "
                          "rewards read it as `solution`, and under its own name too."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Drop rows whose prompt (chat template and image tokens included) is longer than this many "
            "tokens, before training. TRL 1.2 no longer truncates prompts (trl PR #4847), so this script owns it."
        },
    )
    max_image_side: int | None = field(
        default=512,
        metadata={
            "help": "Longest image side, in pixels (0: no limit). Qwen2/2.5-VL spend one token per 28x28 pixels, so "
            "512 caps an image at 324 tokens (18x18 after the processor rounds sides to multiples of 28); Qwen3-VL one "
            "per 32x32 (256 tokens). What happens to a larger image: see --image_policy."
        },
    )
    image_policy: str = field(
        default="downscale",
        metadata={
            "help": "downscale: shrink an image larger than --max_image_side to fit, aspect ratio kept, before the "
            "processor and vLLM see it (the row is kept); drop: drop the row (TRL's example does).",
            "choices": list(IMAGE_POLICIES),
        },
    )
    eval_fraction: float = field(
        default=0.02, metadata={"help": "Fraction of rows held out for evaluation (0 disables the split)."}
    )
    synthetic_rows: int = field(default=512, metadata={"help": "Rows of the `synthetic` dataset."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many rows (before filtering), e.g. for quick runs."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["format", "accuracy"],
        metadata={"help": f"Reward functions: names from {sorted(REWARD_FUNCS)}, and your own as "
                          "path/to/file.py:function or package.module:function (TRL's reward signature, "
                          "`f(completions, **kwargs)`, every dataset column by name). Weights: --reward_weights."},
    )
    system_prompt: str = field(
        default=SYSTEM_PROMPT, metadata={"help": "System prompt; the default asks for the format the rewards check."}
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Validate arguments, data, processor, batch arithmetic and the memory per GPU (see "
                          "--gpu_memory_gb), print the plan, load no weights."},
    )
    gpu_memory_gb: float = field(
        default=80,
        metadata={
            "help": "Memory of one GPU the job will run on, in GB as sold (80: H100, 141: H200). --dry_run estimates "
            "the memory per GPU of this configuration on it (ZeRO-3 shards, LoRA and optimizer, activations, the "
            "loss's logits, the vision tower, vLLM's pool), names the largest term, and refuses a configuration "
            "predicted not to fit (fit_check.py; calibration in experiments/vlm-grpo/BENCHMARKS.md)."
        },
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset filtering."})
    zero3_param_persistence_threshold: int | None = field(
        default=None,
        metadata={
            "help": "ZeRO-3: parameters with fewer elements than this stay whole on every GPU instead of being "
            "all-gathered at each use. Default: accelerate's 10 x hidden_size (20,480 for the 3B: norms and biases "
            "only). 5000000 keeps the vision tower and the attention projections whole (1.4 GiB more per GPU, +2 %% "
            "training throughput, within run-to-run noise: experiments/vlm-grpo/BENCHMARKS.md)."
        },
    )
    zero3_prefetch_bucket_size: int | None = field(
        default=None,
        metadata={
            "help": "ZeRO-3: elements of upcoming parameters all-gathered ahead of use. Default: accelerate's "
            "0.9 x hidden_size^2 (3.8 M for the 3B: less than one MLP matrix of 22.5 M)."
        },
    )
    batched_vision_attention: bool = field(
        default=True,
        metadata={
            "help": "Run the vision tower's attention as one SDPA call per window (or image) size instead of one per "
            "window or image (same result; transformers 4.57's per-window loop cost about 30 %% of Qwen2.5-VL's "
            "training forward pass with 16 images per micro-batch, see vision_attention.py). "
            "--no_batched_vision_attention restores the upstream loop."
        },
    )
    vllm_fast_paths: bool = field(
        default=True,
        metadata={
            "help": "With --use_vllm: take the importance-sampling ratio from the loss forward instead of TRL's extra "
            "no-grad forward, where the policy cannot change between generation and loss; sync weights into vLLM "
            "one block at a time instead of gathering the whole model; preprocess each distinct image once per "
            "rollout (fast_paths.py; equal results, tests/test_fast_paths.py). --no_vllm_fast_paths restores TRL's "
            "paths."
        },
    )
    resume: str = field(
        default="auto",
        metadata={
            "help": "auto: resume from the newest whole trainer checkpoint in FLEXAI_INPUT_CHECKPOINT_DIR or "
            "--output_dir, else start at step 0; require: the same, but stop at once (listing what the folders hold) "
            "when there is none (`make flexai-resume`); continue: like require, and accept arguments that differ from "
            "the saved run's (otherwise refused with the difference); fresh: start at step 0, moving an earlier run "
            "in --output_dir into <output_dir>/previous-K (nothing is deleted).",
            "choices": list(RESUME_MODES),
        },
    )
    resume_weights_only: bool = field(
        default=False,
        metadata={
            "help": "Resume from the checkpoint's adapter weights, step count and LR schedule with a fresh optimizer: "
            "the way to continue a run on another process count (ZeRO-3 optimizer shards are per process)."
        },
    )

    def __post_init__(self):
        # argparse checks `choices` on the command line only; a --config YAML value arrives unchecked.
        if self.resume not in RESUME_MODES:
            raise ConfigError(f"--resume must be one of {list(RESUME_MODES)}, got {self.resume!r}")
        if self.image_policy not in IMAGE_POLICIES:
            raise ConfigError(f"--image_policy must be one of {list(IMAGE_POLICIES)}, got {self.image_policy!r}")
        if self.max_image_side is not None and self.max_image_side < 0:
            raise ConfigError(f"--max_image_side must be >= 0 (0: no limit), got {self.max_image_side}")
        if self.gpu_memory_gb <= 0:
            raise ConfigError(f"--gpu_memory_gb must be > 0 (80 for an H100, 141 for an H200), "
                              f"got {self.gpu_memory_gb}")


def make_parser() -> TrlParser:
    import torch

    parser = TrlParser((VLMGRPOScriptArguments, GRPOConfig, ModelConfig))
    if not torch.cuda.is_available():
        # TRL defaults bf16=True, which TrainingArguments rejects without a GPU, and `use_cpu` would turn DeepSpeed
        # off. So CPU runs (tests, `make smoke`) keep ZeRO-3 with mixed precision off on both sides: the Trainer and
        # the accelerate config's `mixed_precision: bf16` (read from this variable) must agree, or HF refuses.
        parser.set_defaults(bf16=False)
        if os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16":
            os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    # transformers 4.57 reads an unset --report_to as "all": every tracker installed in the image. One that needs a
    # login (wandb without WANDB_API_KEY has no terminal to ask on in a job) would stop the run after the model loaded,
    # so trackers are opt-in: `--report_to wandb` (`make flexai-train WANDB_SECRET=<name>` adds it).
    parser.set_defaults(report_to="none")
    if os.environ.get("FLEXAI_OUTPUT_CHECKPOINT_DIR"):
        # FlexAI mounts a persisted folder here; an explicit --output_dir still wins.
        parser.set_defaults(output_dir=os.environ["FLEXAI_OUTPUT_CHECKPOINT_DIR"])
    return parser


def parse_args(argv: list[str] | None = None):
    """(script_args, training_args, model_args), normalized; `argv` defaults to the command line."""
    parser = make_parser()
    try:
        if argv is None:
            script_args, training_args, model_args = parser.parse_args_and_config()
        else:
            script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    except ValueError as err:
        if "not used by the HfArgumentParser" in str(err):  # a misspelled or unknown flag
            raise ConfigError(f"{err}. `--help` lists the flags.") from err
        if "num_generations" not in str(err):
            raise
        # GRPOConfig's own message names generation_batch_size, which the user never set (fix ledger U8).
        raise ConfigError(
            f"{err} per_device_train_batch_size counts completions, not prompts (trl#3020): "
            "per_device_train_batch_size x processes x gradient_accumulation_steps (or --generation_batch_size) "
            "must be a multiple of --num_generations (default 8)."
        ) from err
    model_args.lora_target_modules = normalize_target_modules(model_args.lora_target_modules)
    return script_args, training_args, model_args


def normalize_target_modules(modules: list[str] | str | None) -> list[str] | str | None:
    """`"q_proj", "v_proj"` (TRL docs' comma form) reaches argparse as ['q_proj,', 'v_proj']: PEFT would then match
    `q_proj,` nowhere and put LoRA on v_proj only, silently (fix ledger U3). Split on commas, drop blanks."""
    if modules is None:
        return None
    if isinstance(modules, str):
        modules = [modules]
    names = [name.strip() for item in modules for name in item.split(",") if name.strip()]
    if names == ["all-linear"]:
        return "all-linear"  # PEFT's keyword, only valid as a plain string
    return names


# ---- checks -----------------------------------------------------------------------------------------------


def validate_args(script_args, training_args, model_args) -> None:
    """Refuse known-bad settings before any data or weights are loaded."""
    from zero3 import zero_stage  # as in setup: zero3 patches TRL's trainer module on import

    try:
        # a typo'd local folder would otherwise reach huggingface_hub as a Hub id: a traceback, not a message
        check_model_path(model_args.model_name_or_path)
    except PathError as err:
        raise ConfigError(str(err)) from err
    try:
        get_reward_funcs(script_args.reward_funcs)
    except ValueError as err:  # unknown names: the message lists the valid ones; `error: ...`, not a traceback
        raise ConfigError(str(err)) from err
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(script_args.reward_funcs):  # TRL checks it after loading weights
        raise ConfigError(f"--reward_weights has {len(weights)} values for {len(script_args.reward_funcs)} "
                          f"--reward_funcs {script_args.reward_funcs}: give one weight per reward")
    if training_args.use_vllm and training_args.vllm_enable_sleep_mode:
        raise ConfigError(
            "--vllm_enable_sleep_mode is broken in TRL 1.2.0: after waking up, vLLM reloads the weights from disk, "
            "so rollouts come from the base model, not the policy being trained (trl#5312). Remove the flag; "
            "lower --vllm_gpu_memory_utilization instead if memory is tight."
        )
    if training_args.use_vllm:
        if not vllm_colocate.vllm_importable():
            message = (
                "--use_vllm needs vLLM, which is not importable here. Use the FlexAI runtime "
                "pytorch-28-vllm-0110-nvidia (or docker/Dockerfile; on a Linux x86-64 CPU machine `make vllm-cpu`), "
                "or drop --use_vllm to generate with transformers."
            )
            if not script_args.dry_run:
                raise ConfigError(message)
            # A laptop without vLLM can still check the exact FlexAI command: everything but the engine itself.
            logger.warning("%s The dry run checks everything else, the vLLM limits included.", message)
        if script_args.max_prompt_length and script_args.max_prompt_length > 4096:
            raise ConfigError(
                f"--max_prompt_length {script_args.max_prompt_length} > 4096: TRL 1.2.0's colocated vLLM hard-codes "
                "max_num_batched_tokens=4096, so longer prompts fail (trl#3788). Use --max_prompt_length 4096 or less."
            )
    if model_args.use_peft and not model_args.lora_target_modules:
        logger.warning("--use_peft without --lora_target_modules: PEFT picks Qwen2's defaults (q_proj, v_proj).")
    if zero_stage() == 3 and model_args.use_peft and os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL") == "false":
        raise ConfigError(
            "ZeRO-3 with zero3_save_16bit_model: false saves an empty LoRA adapter (trl#4416, peft#2892). "
            "Set `zero3_save_16bit_model: true` in the accelerate config (code/vlm-grpo/deepspeed_zero3.yaml has it)."
        )
    plugin = getattr(training_args, "deepspeed_plugin", None)  # --deepspeed JSON: torchrun, the multi-node route
    if training_args.deepspeed and model_args.use_peft and plugin and plugin.zero_stage == 3 and not plugin.zero3_save_16bit_model:
        raise ConfigError(
            f"--deepspeed {training_args.deepspeed}: ZeRO-3 without stage3_gather_16bit_weights_on_model_save saves an "
            "empty LoRA adapter (trl#4416, peft#2892). Set it to true (code/vlm-grpo/deepspeed_zero3.json has it)."
        )
    if script_args.eval_fraction < 0 or script_args.eval_fraction >= 1:
        raise ConfigError(f"--eval_fraction must be in [0, 1), got {script_args.eval_fraction}")


def check_output_location(script_args, training_args) -> None:
    """An unwritable --output_dir stops the run now, not at the first checkpoint save after hours of training.
    A dry run only warns: it may check a FlexAI command (/output-checkpoint/...) on a laptop."""
    if script_args.dry_run:
        problem = output_dir_problem(training_args.output_dir)
        if problem:
            logger.warning("--output_dir %s cannot be written here (%s): fine only where the job runs (FlexAI "
                           "mounts /output-checkpoint)", training_args.output_dir, problem)
        return
    try:
        check_output_dir(training_args.output_dir)
    except PathError as err:
        raise ConfigError(str(err)) from err


def resolve_args(script_args, training_args, model_args, processor=None) -> None:
    """Derived settings: resume point, generation kwargs, model init kwargs."""
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if training_args.use_vllm and training_args.vllm_max_model_length is None and script_args.max_prompt_length:
        # vLLM otherwise sizes for the model's 128k context; the run never needs more than prompt + completion.
        training_args.vllm_max_model_length = script_args.max_prompt_length + training_args.max_completion_length
    training_args.resume_from_checkpoint, script_args.resume_weights_only = resume_point(
        script_args, training_args, model_args)
    if processor is not None:
        # The ban is merged into the user's own generation kwargs: a user `suppress_tokens`/`bad_words` adds to it.
        kwargs = dict(training_args.generation_kwargs or {})
        for key, banned in vision_token_ban(processor.tokenizer, training_args.use_vllm).items():
            kwargs[key] = list(dict.fromkeys([*(kwargs.get(key) or []), *banned]))
        training_args.generation_kwargs = kwargs


# ---- stages -----------------------------------------------------------------------------------------------


def requested_fixes(script_args, training_args, model_args) -> list[str]:
    """The model-touching fixes of families.FIXES this run relies on."""
    fixes = ["vision_token_mask", "image_token_budget"]
    if training_args.gradient_checkpointing:
        fixes.append("zero3_checkpointing")
    if script_args.batched_vision_attention:
        fixes.append("batched_vision_attention")
    if training_args.use_vllm:
        fixes += ["collapse_image_pads", "tied_head_lora_refusal"]
    if "iou" in script_args.reward_funcs:
        fixes.append("iou_reward")
    return fixes


def setup(script_args, training_args, model_args):
    """Checks and derived settings shared by training and --dry_run; returns the processor."""
    import torch

    from zero3 import configure_zero3

    validate_args(script_args, training_args, model_args)
    configure_zero3(
        training_args,
        on_gpu=torch.cuda.is_available(),
        zero_optimization={
            "stage3_param_persistence_threshold": script_args.zero3_param_persistence_threshold,
            "stage3_prefetch_bucket_size": script_args.zero3_prefetch_bucket_size,
        },
    )
    check_output_location(script_args, training_args)
    try:
        family = families.family_of(model_args)  # config.json only: an unsupported model stops here, in one line
        processor = load_processor(model_args)
    except OSError as err:  # a Hub id that is not there (or not cached offline): transformers' message spans lines
        raise ConfigError(str(model_load_error(model_args.model_name_or_path, err))) from err
    families.check_processor(family, processor)
    families.check_fixes(family, requested_fixes(script_args, training_args, model_args))
    enable_batched_vision_attention(script_args.batched_vision_attention)
    resolve_args(script_args, training_args, model_args, processor)
    vllm_colocate.check_vllm_lora_targets(training_args, model_args)
    return processor


def load_processor(model_args):
    from transformers import AutoProcessor

    # Left padding and left truncation: GRPO generates after the prompt.
    return AutoProcessor.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
        padding_side="left",
        truncation_side="left",
    )


def load_source(script_args, training_args, limit: int | None = None):
    """(raw rows to use, rows in the source): the source cut to --max_train_samples (and `limit`)."""
    raw = load_raw_dataset(
        script_args.dataset_name,
        script_args.dataset_config,
        script_args.dataset_train_split,
        synthetic_rows=script_args.synthetic_rows,
        seed=training_args.seed,
        columns=data_columns(script_args),
    )
    source_rows = len(raw)
    n = min(x for x in (source_rows, script_args.max_train_samples, limit) if x is not None)
    if n < source_rows:
        raw = raw.select(range(n))
    return raw, source_rows


def load_datasets(script_args, training_args, processor, limit: int | None = None):
    """(train, eval or None, FilterStats)."""
    # Once per node: under `accelerate launch` the node's first process loads and prepares the data (decoding every
    # image) while the others wait at a barrier; they then find datasets' cache files of each step (same source,
    # same function and arguments, so the same fingerprint) and read them instead of redoing the work. Sources held
    # in memory (`synthetic`) have no cache: every process builds those, small, again. Scripts without a trainer
    # (evaluate.py) pass a namespace without main_process_first.
    first = getattr(training_args, "main_process_first", None)
    with first(local=True, desc="dataset preparation") if first else contextlib.nullcontext():
        raw, source_rows = load_source(script_args, training_args, limit)
        # each row keeps its position in the source, so a run can record exactly which rows it held out (split.json)
        raw = raw.add_column(SOURCE_INDEX, list(range(len(raw))))
        dataset, stats = prepare_dataset(
            raw,
            processor,
            max_image_side=script_args.max_image_side,
            max_prompt_length=script_args.max_prompt_length,
            system_prompt=script_args.system_prompt,
            num_proc=script_args.dataset_num_proc,
            image_policy=script_args.image_policy,
        )
    stats.source_rows = source_rows
    if getattr(training_args, "should_log", True):  # the node's first process: one "kept" line, not one per GPU
        logger.info("dataset: %s", stats.summary())
    train, held_out = split_train_eval(dataset, script_args.eval_fraction if limit is None else 0, training_args.seed)
    return train, held_out, stats


def batch_plan(training_args, num_train_rows: int) -> dict:
    """GRPO's batch arithmetic: per_device_train_batch_size counts completions, not prompts (trl#3020)."""
    procs = training_args.world_size
    completions_per_step = training_args.per_device_train_batch_size * procs * training_args.gradient_accumulation_steps
    prompts_per_step = completions_per_step / training_args.num_generations
    if training_args.max_steps > 0:
        steps = training_args.max_steps
    else:
        steps = math.ceil(training_args.num_train_epochs * num_train_rows / prompts_per_step)
    return {
        "processes": procs,
        "num_generations": training_args.num_generations,
        "completions_per_step": completions_per_step,
        "prompts_per_step": prompts_per_step,
        "completions_per_generation": training_args.generation_batch_size,
        "steps_per_generation": training_args.steps_per_generation,
        "train_rows": num_train_rows,
        "steps": steps,
        "max_completion_length": training_args.max_completion_length,
        "generation": f"vLLM {training_args.vllm_mode}" if training_args.use_vllm else "transformers",
    }


def build_trainer(script_args, training_args, model_args, processor, train_dataset, eval_dataset, callbacks=None):
    from trainer import VLMGRPOTrainer

    peft_config = get_peft_config(model_args)
    reward_funcs = get_reward_funcs(script_args.reward_funcs)
    check_reward_funcs(script_args.reward_funcs, reward_funcs, train_dataset[0])  # before the weights load
    return VLMGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=callbacks,
        fast_paths=script_args.vllm_fast_paths,
    )


def dry_run(script_args, training_args, model_args, processor) -> dict:
    """Prepare the first rows for real, survey every row from its image header (sizes, image tokens, prompt lengths,
    rows kept under each --image_policy), check the processor, the batch arithmetic and the memory per GPU (fit_check.py);
    print the plan. Loads no model weights."""
    checked, _, stats = load_datasets(script_args, training_args, processor, limit=32)
    check_reward_funcs(script_args.reward_funcs, get_reward_funcs(script_args.reward_funcs), checked[0])
    raw, _ = load_source(script_args, training_args)
    survey = survey_dataset(
        raw,
        processor,
        max_image_side=script_args.max_image_side,
        max_prompt_length=script_args.max_prompt_length,
        system_prompt=script_args.system_prompt,
    )
    kept = survey["kept"][script_args.image_policy]
    # split_train_eval's arithmetic: at least one row held out when the fraction is > 0
    held_out = max(1, math.floor(kept * script_args.eval_fraction)) if script_args.eval_fraction > 0 and kept > 1 else 0
    plan = batch_plan(training_args, num_train_rows=max(kept - held_out, 1))
    plan.update(
        dataset=script_args.dataset_name,
        checked_rows=stats.summary(),
        output_dir=training_args.output_dir,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        lora_target_modules=model_args.lora_target_modules if model_args.use_peft else None,
        gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs
        if training_args.gradient_checkpointing
        else None,
    )
    plan["data"] = {"image_policy": script_args.image_policy, **survey}
    longest = (survey["prompt_tokens"].get(script_args.image_policy) or {}).get("max")
    if longest is not None and script_args.max_prompt_length:
        longest = min(longest, script_args.max_prompt_length)  # longer rows are dropped before training
    plan["vllm"] = vllm_colocate.check_vllm_limits(training_args, model_args, longest)
    if plan["vllm"] is not None and survey["images_per_row"]:  # what trainer.py gives vLLM (M12, vllm_colocate.py)
        plan["vllm"]["limit_mm_per_prompt"] = {"image": survey["images_per_row"]["max"]}
    plan["fit"] = check_fit(script_args, training_args, model_args, survey)  # refuses a run that cannot fit
    plan["note"] = (
        f"checked_rows: the first {stats.total} rows decoded and prepared; data and train_rows: all {survey['rows']} "
        "rows read from their image headers (an image truncated after its header is dropped only when decoded)"
    )
    print("dry run plan: " + json.dumps(plan, indent=2, default=str))
    return plan


def train(script_args, training_args, model_args, processor, callbacks=None):
    """Load data, build the trainer, train (resuming where a checkpoint exists); returns the trainer, whose
    `graceful_stop.signum` is set when SIGTERM/SIGINT stopped it early."""
    train_dataset, held_out, _ = load_datasets(script_args, training_args, processor)
    record = split_record(script_args, training_args, train_dataset, held_out)
    signature = json.dumps(training_signature(script_args, training_args, model_args), indent=1)
    if training_args.process_index == 0:  # one plan per run, not one per process
        logger.info("plan: %s", json.dumps(batch_plan(training_args, len(train_dataset))))
        write_split_record(Path(training_args.output_dir), record)
        (Path(training_args.output_dir) / RUN_ARGS).write_text(signature)
    stop = GracefulStop()
    callbacks = [*(callbacks or []), stop]
    trainer = build_trainer(script_args, training_args, model_args, processor, train_dataset, None, callbacks)
    # written into every checkpoint before it gets its name: a fetched checkpoint-N carries the split and arguments
    trainer.checkpoint_extra_files = {SPLIT_RECORD: json.dumps(record), RUN_ARGS: signature}
    trainer.weights_only_resume = script_args.resume_weights_only
    trainer.graceful_stop = stop
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return trainer


def save_outputs(trainer, processor, output_dir: str) -> Path:
    """Save adapter (or full model) and processor; refuse to finish with an empty adapter (trl#4416)."""
    trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(output_dir)
    trainer.accelerator.wait_for_everyone()
    adapter = Path(output_dir) / "adapter_model.safetensors"
    if adapter.exists():
        check_adapter_file(adapter)
        return adapter
    return Path(output_dir)


def main(script_args, training_args, model_args) -> Path | None:
    # force: intel_extension_for_pytorch (loaded by the CPU build of vLLM) gives the root logger a handler at
    # WARNING, which would silence this script's INFO lines (the data counts, the plan)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    processor = setup(script_args, training_args, model_args)
    if script_args.dry_run:
        dry_run(script_args, training_args, model_args, processor)
        return None
    trainer = train(script_args, training_args, model_args, processor)
    stop = trainer.graceful_stop
    if stop.signum:  # stopped early on purpose: the checkpoint is the result, not a final adapter
        if trainer.accelerator.is_main_process:
            print(f"stopped by {stop.signal_name} after step {stop.stopped_at}: checkpoint-{stop.stopped_at} "
                  f"saved in {training_args.output_dir}; run the same command to resume (exit status "
                  f"{stop.exit_status})", flush=True)
        raise SystemExit(stop.exit_status)
    saved = save_outputs(trainer, processor, training_args.output_dir)
    if trainer.accelerator.is_main_process:
        print(f"saved: {saved}")
    return saved


if __name__ == "__main__":
    try:
        main(*parse_args())
    except (ConfigError, DatasetError, RewardError) as err:
        sys.exit(f"error: {err}")
    # The run is over and saved: spare the interpreter's last garbage scan of the millions of long-lived objects that
    # torch, vLLM and transformers hold (atexit handlers still run). On a 2-core machine a 2-process launch exits
    # 1.8 s after its `saved:` line instead of 3.3 s (experiments/vlm-grpo/cpu-results/suite-speedups.json).
    gc.freeze()
