"""Resume policy: which checkpoint a run starts from, and whether with its optimizer.

checkpoints.py holds the mechanism (finding checkpoints, checking one is whole, saving them crash-consistently, the
run's argument signature); this module holds the rules on top of it: `--resume auto|require|continue|fresh`, an
explicit `--resume_from_checkpoint`, `--resume_weights_only`, saved arguments that differ, and one decision shared by
every process. grpo_vlm.py's setup takes it with one call, `resume_point` (from resolve_args).
"""

from __future__ import annotations

import logging
import os

from checkpoints import (
    CheckpointError,
    check_explicit_checkpoint,
    choose_checkpoint,
    describe_folder,
    holds_a_run,
    move_run_aside,
    read_signature,
    signature_diff,
    training_signature,
)
from config_error import ConfigError

logger = logging.getLogger("grpo_vlm")

RESUME_MODES = ("auto", "require", "continue", "fresh")  # --resume
# Saved arguments the machine decides, not the user: without a GPU the script turns TRL's bf16=True off (grpo_vlm's
# parser), so a `--dry_run` on a laptop of a GPU job's command differs from the job's checkpoints in bf16 alone. The dry
# run checks the user's command, so it does not compare them (the job itself, on GPUs, still does).
MACHINE_FIELDS = ("bf16",)


def resume_point(script_args, training_args, model_args) -> tuple[str | None, bool]:
    """(checkpoint to resume or None, whether weights only) from --resume, decided once for all processes: the first
    process decides (and may move an old run aside), the others receive its decision, so every process resumes the
    same checkpoint or fails with the same line."""
    import torch.distributed as dist

    distributed = training_args.world_size > 1 and dist.is_available() and dist.is_initialized()
    decision = None
    if not distributed or training_args.process_index == 0:
        try:
            decision = decide_resume(script_args, training_args, model_args)
        except (CheckpointError, ConfigError) as err:
            decision = {"error": str(err)}
    if distributed:
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
    if decision.get("error"):
        raise ConfigError(decision["error"])
    return decision["path"], decision["weights_only"]


def decide_resume(script_args, training_args, model_args) -> dict:
    """{"path", "weights_only"}: what --resume, the folders and the saved arguments say; raises with one line."""
    mode, out = script_args.resume, training_args.output_dir
    input_dir = os.environ.get("FLEXAI_INPUT_CHECKPOINT_DIR")
    # A dry run is not launched like the job (one process, no DeepSpeed): it does not check the process count.
    world_size = None if script_args.dry_run else training_args.world_size
    deepspeed = None if script_args.dry_run else uses_deepspeed(training_args)
    current = training_signature(script_args, training_args, model_args)
    if script_args.dry_run:
        current = {k: v for k, v in current.items() if k not in MACHINE_FIELDS}
    weights_only = script_args.resume_weights_only
    if weights_only and not model_args.use_peft:
        raise ConfigError("--resume_weights_only loads a checkpoint's LoRA adapter: it needs --use_peft (a full "
                          "fine-tuning checkpoint must be resumed with the same process count)")
    if training_args.resume_from_checkpoint:  # the user named it: checked, never replaced by another
        if mode == "fresh":
            raise ConfigError("--resume fresh with --resume_from_checkpoint: choose one")
        choice = check_explicit_checkpoint(training_args.resume_from_checkpoint, world_size, deepspeed, weights_only)
        diff = signature_diff(read_signature(choice.path) or {}, current)
        logger.info("resuming from %s (step %s%s)%s", choice.path, choice.step,
                    ", weights only" if choice.weights_only or weights_only else "",
                    f"; changed arguments: {diff}" if diff else "")
        return {"path": choice.path, "weights_only": choice.weights_only or weights_only}
    if mode == "fresh":
        moved = None if script_args.dry_run else move_run_aside(out)
        logger.info("--resume fresh: starting at step 0%s",
                    f"; the earlier run in {out} moved to {moved}" if moved else "")
        return {"path": None, "weights_only": False}
    choice = choose_resume_checkpoint(out, world_size, deepspeed, weights_only)
    fresh_hint = (f"--resume fresh to start at step 0 (the earlier run is moved to {out}/previous-K, nothing is "
                  "deleted), or another --output_dir")
    if choice.path is None:
        if mode in ("require", "continue"):
            skipped = f"; damaged: {'; '.join(choice.skipped)}" if choice.skipped else ""
            raise ConfigError(f"--resume {mode}: no whole trainer checkpoint in FLEXAI_INPUT_CHECKPOINT_DIR="
                              f"{describe_folder(input_dir)} nor in --output_dir {describe_folder(out)}{skipped}")
        if input_dir:
            logger.warning("FLEXAI_INPUT_CHECKPOINT_DIR=%s holds no whole trainer checkpoint: starting at step 0",
                           input_dir)
        saved = read_signature(out)
        diff = signature_diff(saved, current) if saved and holds_a_run(out) else ""
        if diff and not script_args.dry_run:
            raise ConfigError(f"--output_dir {out} holds a run with other arguments ({diff}) and no checkpoint to "
                              f"resume; starting over would overwrite its files: pass {fresh_hint}")
        return {"path": None, "weights_only": False}
    saved = read_signature(choice.path)
    diff = signature_diff(saved, current) if saved else ""
    if diff and mode != "continue":
        raise ConfigError(f"{choice.path} (step {choice.step}) was trained with other arguments ({diff}): pass "
                          f"--resume continue to resume it with the new ones, {fresh_hint}")
    logger.info("resuming from %s (step %s%s)%s", choice.path, choice.step,
                ", weights only: fresh optimizer" if choice.weights_only else "",
                f"; changed arguments: {diff}" if diff else "")
    return {"path": choice.path, "weights_only": choice.weights_only}


def choose_resume_checkpoint(output_dir, world_size, deepspeed, weights_only=False):
    """checkpoints.choose_checkpoint over FLEXAI_INPUT_CHECKPOINT_DIR and output_dir, each damaged one it skipped
    logged in one warning."""
    choice = choose_checkpoint(output_dir, os.environ.get("FLEXAI_INPUT_CHECKPOINT_DIR"), world_size, deepspeed,
                               weights_only)
    for skipped in choice.skipped:
        logger.warning("skipping a damaged checkpoint: %s", skipped)
    return choice


def find_resume_checkpoint(output_dir: str | None, world_size: int | None = None, deepspeed: bool | None = None):
    """The newest whole trainer checkpoint across FlexAI's input checkpoint (`--checkpoint` of `flexai training run`,
    mounted at FLEXAI_INPUT_CHECKPOINT_DIR in any layout: root, checkpoint-N/, <name>/..., grpo-.../checkpoint-N)
    and output_dir's checkpoint-N (a restarted job continues where it stopped), or None. Damaged ones are skipped
    with one warning each (checkpoints.checkpoint_problem)."""
    return choose_resume_checkpoint(output_dir, world_size, deepspeed).path


def uses_deepspeed(training_args) -> bool:
    from zero3 import zero_stage  # imported when a run is set up: zero3 patches TRL's trainer module on import

    return bool(getattr(training_args, "deepspeed", None) or getattr(training_args, "deepspeed_plugin", None)
                or zero_stage() is not None)
