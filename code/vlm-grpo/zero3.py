"""GRPOTrainer with the fixes this stack needs under DeepSpeed ZeRO-3 (see ../shared KNOWN_ISSUES M1-M4)."""

from __future__ import annotations

from trl import GRPOTrainer


class VLMGRPOTrainer(GRPOTrainer):
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        # M4: with only LoRA weights trainable, the Trainer's no-decay group is empty. DeepSpeed's ZeRO-3 optimizer
        # drops empty groups while the LR scheduler keeps one base_lr per original group, and torch >= 2.10 then fails
        # in scheduler.step() (`zip() argument 2 is longer`); torch 2.8 truncates silently.
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer
