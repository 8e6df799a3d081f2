"""What GRPO + LoRA + DeepSpeed ZeRO-3 needs on this stack (TRL 1.2.0, transformers 4.57.6, DeepSpeed 0.18.9).

Each fix names the failure it prevents (its id in the fix ledger, experiments/vlm-grpo/INTERNALS.md) and its root
cause; all are exercised by tests/test_train_cpu.py, which trains 2 ZeRO-3 processes on CPU and checks every LoRA
weight moved, and tests/test_zero3_gradients.py checks M1's gradients: one step's LoRA gradients under 2-process ZeRO-3 with
checkpointing equal those of one plain process on the same fixed batch.

M1  non-reentrant checkpointing under ZeRO-3: `CheckpointError: Recomputed values ... different metadata`, frozen
    weights of shape [0]. Cause: during recomputation torch keeps frozen weights by reference and compares their
    metadata only after the whole layer re-ran, by which time DeepSpeed's post-forward hook has re-partitioned them
    (`param.data = torch.empty(0)`). The values used by backward are re-gathered by DeepSpeed's pre-backward hooks,
    so only the check is wrong. Fixed upstream in DeepSpeed 0.19.3 (deepspeedai/DeepSpeed#8148); here:
    `determinism_check="none"` (zero3_checkpointing_kwargs). Reentrant checkpointing is no way out: it makes the vision
    tower's blocks warn "None of the inputs have requires_grad" (M3) and silently drops gradients for any adapter
    placed there.
M1' TRL 1.2.0 re-enables checkpointing after every rollout with no kwargs, which transformers 4.57 turns into
    `use_reentrant=True`: the configured mode lasts one step (huggingface/trl#6827). unwrap_model_for_generation
    below re-applies the configured kwargs.
M2  HF generation with `ds3_gather_for_generation=True`: `IndexError: pop from an empty deque` at step 2. Cause: TRL
    re-registers DeepSpeed's hooks after generation; the registration numbers modules from a shared mutable default
    counter, so every module gets a new `ds_id` while the parameter coordinator's recorded fetch order is keyed by the
    old ones. Fixed upstream in DeepSpeed 0.19.2 (#8043) and TRL 1.5.0 (#4693), which drop the trace; here the
    original ids are restored, which keeps the trace and its prefetching.
M4  only LoRA weights trainable: the Trainer's no-decay param group is empty, DeepSpeed deletes it while the LR
    scheduler keeps one base_lr per original group; torch >= 2.10 raises `zip() argument 2 is longer than argument 1`
    in `lr_scheduler.step()`, torch 2.8 silently truncates. Empty groups are dropped before the scheduler is built
    (trainer.py, VLMGRPOTrainer.create_optimizer).
CPU DeepSpeed 0.18.9's blocking coalesced all-gather (used by `GatheredParameters`) waits only on the last of its async
    all-gathers, which is enough with NCCL's in-order stream but not with gloo, whose worker threads finish out of
    order: gathered weights keep being written while the model already runs (NaN logits, changed weights). On CPU
    only, `stage3_allgather_sequential` makes those gathers blocking, one by one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import trl.trainer.grpo_trainer as _trl_grpo_trainer

logger = logging.getLogger(__name__)

_trl_unwrap_model_for_generation = _trl_grpo_trainer.unwrap_model_for_generation


def zero3_checkpointing_kwargs(kwargs: dict | None) -> dict:
    """Gradient-checkpointing kwargs that work under ZeRO-3 (M1): non-reentrant, without the metadata check."""
    kwargs = dict(kwargs or {})
    kwargs.setdefault("use_reentrant", False)
    if not kwargs["use_reentrant"]:
        kwargs.setdefault("determinism_check", "none")
    return kwargs


def checkpointing_kwargs_in_use(model) -> dict | None:
    """The kwargs the model's checkpointed layers were enabled with (None when checkpointing is off)."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            func = getattr(module, "_gradient_checkpointing_func", None)
            if isinstance(func, functools.partial):
                return dict(func.keywords)
    return None


@contextlib.contextmanager
def unwrap_model_for_generation(model, accelerator, gather_deepspeed3_params=True, generation_kwargs=None):
    """TRL's context manager, plus: the checkpointing kwargs survive (M1') and ZeRO-3 module ids too (M2)."""
    unwrapped = accelerator.unwrap_model(model)
    checkpointing = checkpointing_kwargs_in_use(unwrapped)
    ds_ids = {m: m.ds_id for m in unwrapped.modules() if hasattr(m, "ds_id")}
    try:
        with _trl_unwrap_model_for_generation(
            model, accelerator, gather_deepspeed3_params=gather_deepspeed3_params, generation_kwargs=generation_kwargs
        ) as generation_model:
            yield generation_model
    finally:
        for module, ds_id in ds_ids.items():
            module.ds_id = ds_id
        if checkpointing is not None:
            unwrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)


# GRPOTrainer looks the context manager up in its own module: swap it there, for this trainer and any other.
_trl_grpo_trainer.unwrap_model_for_generation = unwrap_model_for_generation


def zero_stage() -> int | None:
    """ZeRO stage from `accelerate launch`'s environment (None outside DeepSpeed)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if stage else None


def configure_zero3(training_args, on_gpu: bool, zero_optimization: dict | None = None) -> None:
    """Adjust the DeepSpeed config the trainer will use, before any model is created: the one accelerate built from
    deepspeed_zero3.yaml (`accelerate launch`), or the one transformers built from `--deepspeed deepspeed_zero3.json`
    (torchrun, FlexAI's multi-node launcher); in both the plugin holds it.

    zero_optimization: keys set in the config's `zero_optimization` section, replacing the "auto" values that
    accelerate would otherwise fill from the model's hidden size (e.g. `stage3_param_persistence_threshold`)."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        return
    if training_args.gradient_checkpointing:
        training_args.gradient_checkpointing_kwargs = zero3_checkpointing_kwargs(training_args.gradient_checkpointing_kwargs)
    settings = {k: v for k, v in (zero_optimization or {}).items() if v is not None}
    if not on_gpu:
        settings["stage3_allgather_sequential"] = True
    if not settings:
        return
    configs = [plugin.deepspeed_config]
    hf_config = getattr(getattr(plugin, "hf_ds_config", None), "config", None)
    if hf_config is not None and hf_config is not plugin.deepspeed_config:
        configs.append(hf_config)
    for config in configs:
        config.setdefault("zero_optimization", {}).update(settings)
    plugin.set_deepspeed_weakref()  # transformers' zero.Init reads this copy when loading the model
