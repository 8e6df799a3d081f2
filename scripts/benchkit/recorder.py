"""Per-rank timers of the benchmark: each phase of a GRPO step timed (CUDA-synchronized at its boundaries), its peak
GPU memory, and the counters the FLOP model needs; one JSON line per optimizer step."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from .flops import train_flops


class Recorder:
    """Per-rank phase timers and counters, one JSON line per optimizer step."""

    def __init__(self, path: Path, arch: dict):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.path, self.arch = path, arch
        self.lora_r, self.checkpointing = 16, False
        self.last_end = None
        self.frames: list[dict] = []
        self.reset()

    def reset(self):
        self.phases: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.memory: dict[str, int] = {}  # phase -> peak allocated bytes, phase_extra -> peak minus entry
        self.step_peak = 0

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def add(self, key: str, value: float, table: str = "phases"):
        t = getattr(self, table)
        t[key] = t.get(key, 0.0) + value

    def timed(self, name: str, fn, when=None, after=None):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if when is not None and not when():
                return fn(*args, **kwargs)
            self.sync()
            self.memory_enter()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.add(name, time.perf_counter() - t0)
            self.memory_exit(name)
            if after is not None:
                after(args, kwargs, out)
            return out

        return wrapper

    # Peak GPU memory of each phase, nested phases included: torch has one peak counter, so each phase resets it on
    # entry after handing the peak so far to the phases around it, and hands its own peak on at exit.
    def memory_enter(self):
        if not self.cuda:
            return
        peak = self.torch.cuda.max_memory_allocated()
        for frame in self.frames:
            frame["peak"] = max(frame["peak"], peak)
        self.step_peak = max(self.step_peak, peak)
        self.torch.cuda.reset_peak_memory_stats()
        self.frames.append({"peak": 0, "start": self.torch.cuda.memory_allocated()})

    def memory_exit(self, name: str):
        if not self.cuda:
            return
        peak = self.torch.cuda.max_memory_allocated()
        frame = self.frames.pop()
        frame["peak"] = max(frame["peak"], peak)
        for outer in self.frames:
            outer["peak"] = max(outer["peak"], frame["peak"])
        self.step_peak = max(self.step_peak, frame["peak"])
        self.memory[name] = max(self.memory.get(name, 0), frame["peak"])
        self.memory[f"{name}_extra"] = max(self.memory.get(f"{name}_extra", 0), frame["peak"] - frame["start"])

    def count_nograd(self, args, kwargs, out):
        """FLOPs of a no-grad log-prob forward (old policy / reference): the loss forward's formula, forward only."""
        input_ids, logits_to_keep = args[2], args[4] if len(args) > 4 else kwargs["logits_to_keep"]
        grids = kwargs.get("image_grid_thw")
        patches = [int(g.prod()) for g in grids] if grids is not None else []
        B, T = input_ids.shape
        f = train_flops(self.arch, B, T, logits_to_keep, patches, self.lora_r, checkpointing=False)
        self.add("flops_nograd", f["fwd"], "counts")

    def count_generation(self, args, kwargs, out):
        completion_ids = out[0]
        self.add("completions_generated", len(completion_ids), "counts")
        self.add("generated_tokens", sum(len(c) for c in completion_ids), "counts")

    def count_training(self, args, kwargs, out):
        inputs = args[2] if len(args) > 2 else kwargs["inputs"]
        B, Tp = inputs["prompt_ids"].shape
        Tc = inputs["completion_ids"].shape[1]
        grids = inputs.get("image_grid_thw")
        patches = [int(g.prod()) for g in grids] if grids is not None else []
        f = train_flops(self.arch, B, Tp + Tc, Tc, patches, self.lora_r, self.checkpointing)
        for key, value in f.items():
            self.add(f"flops_{key}", value, "counts")
        self.add("completions_trained", B, "counts")
        self.add("train_tokens_padded", B * (Tp + Tc), "counts")
        real = int(inputs["prompt_mask"].sum()) + int(inputs["completion_mask"].sum())
        self.add("train_tokens_real", real, "counts")
        self.add("image_patches", sum(patches), "counts")

    def step_begin(self):
        self.sync()
        if self.last_end is None:
            self.last_end = time.perf_counter()
        self.begin = time.perf_counter()

    def step_end(self, step: int):
        self.sync()
        now = time.perf_counter()
        mem = {}
        if self.cuda:
            t = self.torch.cuda
            mem = {"max_allocated": max(self.step_peak, t.max_memory_allocated()), "max_reserved": t.max_memory_reserved()}
        record = {
            "step": step,
            "step_s": now - self.begin,
            "interval_s": now - self.last_end,  # since the previous step ended: data loading and logging included
            "phases": self.phases,
            "counts": self.counts,
            "memory": mem,
            "phase_memory": self.memory,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.last_end = now
        self.reset()


def install_timers(rec: Recorder):
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from trainer import VLMGRPOTrainer

    def patch(cls, name, phase, **kw):
        setattr(cls, name, rec.timed(phase, getattr(cls, name), **kw))

    patch(VLMGRPOTrainer, "_generate_and_score_completions", "rollout")
    patch(VLMGRPOTrainer, "_generate_single_turn", "generation", after=rec.count_generation)
    patch(VLMGRPOTrainer, "_calculate_rewards", "reward")
    # With gradients off, this is the old-policy or reference log-prob pass of the rollout; with gradients on it is
    # inside compute_loss, timed there.
    patch(VLMGRPOTrainer, "_get_per_token_logps_and_entropies", "logps_nograd", when=lambda: not torch.is_grad_enabled(),
          after=rec.count_nograd)
    patch(VLMGRPOTrainer, "compute_loss", "forward", after=rec.count_training)
    # The vision tower inside the loss forward (gradients on); the rollout's prefill runs it under no_grad.
    patch(Qwen2_5_VisionTransformerPretrainedModel, "forward", "vision_in_forward", when=torch.is_grad_enabled)
    patch(DeepSpeedEngine, "backward", "backward")
    patch(DeepSpeedEngine, "step", "optimizer")
