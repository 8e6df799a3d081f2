"""One process of `accelerate launch` (`scripts/bench.py --worker SPEC`): timers wrapped around the trainer's methods,
then the training script's own stages (grpo_vlm.setup / grpo_vlm.train)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from . import RECIPE
from .flops import load_arch
from .recorder import Recorder, install_timers
from .vllm_stand_in import compare_syncs, install_vllm_stand_in


def profile_rollout(trainer, path: Path, at_step: int) -> None:
    """cProfile of one rollout (`_generate_and_score_completions`) at optimizer step `at_step` (after the measured
    steps, so its overhead is in no measured number), top functions by cumulative time written to `path`."""
    import cProfile
    import io
    import pstats

    rollout = trainer._generate_and_score_completions

    def profiled(*args, **kwargs):
        if trainer.state.global_step + 1 != at_step:
            return rollout(*args, **kwargs)
        prof = cProfile.Profile()
        out = prof.runcall(rollout, *args, **kwargs)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
        path.write_text(text.getvalue())
        return out

    trainer._generate_and_score_completions = profiled


def worker(spec_path: str) -> None:
    import logging

    import torch
    from transformers import TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(RECIPE))
    import grpo_vlm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    rec = Recorder(Path(spec["record_dir"]) / f"rank{rank}.jsonl", load_arch(Path(spec["model"])))
    install_timers(rec)
    if spec.get("vllm_stand_in"):
        install_vllm_stand_in(spec["completion_length"], rec)

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            rec.step_begin()

        def on_step_end(self, args, state, control, **kwargs):
            rec.step_end(state.global_step)

    script_args, training_args, model_args = grpo_vlm.parse_args(spec["argv"])
    rec.lora_r = model_args.lora_r
    rec.checkpointing = bool(training_args.gradient_checkpointing)
    processor = grpo_vlm.setup(script_args, training_args, model_args)

    build_trainer = grpo_vlm.build_trainer

    def build_with_timers(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(Steps())
        if spec.get("profile_step") and rank == 0:
            profile_rollout(trainer, Path(spec["record_dir"]) / "rollout_profile_rank0.txt", spec["profile_step"])
        vllm = getattr(trainer, "vllm_generation", None)
        if spec.get("vllm_stand_in") and vllm is not None:
            # M8's wrapper (vllm_colocate.py) checks vLLM's own expansion of the image placeholders against the
            # trainer's ids; the stand-in has no engine that expands anything, so it gets TRL's call directly.
            vars(vllm).pop("generate", None)
        elif vllm is not None:  # the real engine: its generate call (M8's hand-off included) is the engine's time
            vllm.generate = rec.timed("vllm_generate", vllm.generate)
        if vllm is not None and hasattr(vllm, "sync_weights"):
            vllm.sync_weights = rec.timed("weight_sync", vllm.sync_weights)
        return trainer

    grpo_vlm.build_trainer = build_with_timers  # grpo_vlm.train looks it up at call time
    trainer = grpo_vlm.train(script_args, training_args, model_args, processor)  # no save: steps only
    if spec.get("vllm_stand_in") and getattr(trainer, "layerwise_weight_sync", False):
        report = compare_syncs(trainer)
        (Path(spec["record_dir"]) / f"sync_rank{rank}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
