"""TRL's GRPOTrainer with this recipe's fixes wired in: ZeRO-3 (zero3.py), the vLLM colocate path (vllm_colocate.py)
and one policy for sampling and scoring (generation.py). Each fix's cause is written where the fix lives."""

from __future__ import annotations

import contextlib

from trl import GRPOTrainer

from fast_paths import FastPaths
from checkpoints import CrashConsistentSaveMixin
import zero3  # noqa: F401  (swaps TRL's unwrap_model_for_generation for the M1'/M2 fixed one)
from generation import ban_tokens_in_logits, vision_token_ban
from data import max_images_per_row
from families import family_from_config
from vllm_colocate import align_prompts_with_vllm, cpu_thread_binding_workaround, images_per_prompt_limit


class VLMGRPOTrainer(CrashConsistentSaveMixin, FastPaths, GRPOTrainer):  # FastPaths: fast_paths.py (F1, F2)
    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args")
        image_limit = contextlib.nullcontext()
        if training_args is not None and training_args.use_vllm and training_args.vllm_mode == "colocate":
            cpu_thread_binding_workaround()  # M9, before TRL builds the engine; a no-op on GPUs
            if kwargs.get("train_dataset") is not None:
                image_limit = images_per_prompt_limit(max_images_per_row(kwargs["train_dataset"]))  # M12
        with image_limit:
            super().__init__(*args, **kwargs)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        # M10: the tokens vLLM (bad_words) and HF generation (suppress_tokens) can never sample are masked in the
        # trainer's log-probs too, so sampling and scoring see the same policy. A separate reference model (full
        # fine-tuning with a KL term; with LoRA the reference is the policy with its adapter off) gets the same mask.
        banned = vision_token_ban(tokenizer, use_vllm=False)["suppress_tokens"]
        for model in (self.model, getattr(self.ref_model, "module", self.ref_model)):
            if model is not None:
                ban_tokens_in_logits(model, banned)
        if self.use_vllm:
            # M8: the placeholder id is the checkpoint's own (config.image_token_id, families.py)
            align_prompts_with_vllm(self.vllm_generation, family_from_config(self.model.config).image_token_id)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.param_groups[:] = [g for g in inner.param_groups if g["params"]]  # M4 (zero3.py)
        return optimizer
