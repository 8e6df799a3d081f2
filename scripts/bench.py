#!/usr/bin/env python
"""Benchmark GRPO steps of the recipe: each phase timed, throughput, peak memory and training-phase MFU.

    python3 scripts/bench.py --out outputs/bench                       # `make bench`: seed vs tuned, 3B architecture
    python3 scripts/bench.py --out outputs/bench --parallel            # 4 GPUs: seed on 0-1 and tuned on 2-3 at once
    python3 scripts/bench.py --out outputs/bench-cpu --preset tiny --warmup 1 --steps 1 --completion_length 16
    python3 scripts/bench.py --out /tmp/bench --vllm_stand_in --configs seed-trl,seed,tuned-trl,tuned   # no vLLM here
    python3 scripts/bench.py --refigure experiments/vlm-grpo/bench-results/3-batched-vision-zero3-knobs.json

What runs: Qwen2.5-VL-3B-Instruct's architecture with random weights (scripts/make_tiny_model.py --preset 3b, built
offline), the synthetic dataset at a realistic image size (448 px: 1024 patches, 256 image tokens), LoRA on q_proj
and v_proj, bf16, ZeRO-3 over all visible GPUs through the project's accelerate config and the training script's own
stages (grpo_vlm.setup / grpo_vlm.train). Each configuration is a separate `accelerate launch`; this file is also
its entry point (`--worker`), which wraps trainer methods with timers before calling the script's stages.

Fixed completion length: random weights almost never emit EOS, but "almost" would still make runs differ, so every
completion is forced to exactly --completion_length tokens (`min_new_tokens` for transformers; `min_tokens` for
vLLM), passed as generation_kwargs through a `--config` YAML (the CLI cannot take a dict for it).

Phases (seconds per optimizer step, CUDA-synchronized at each boundary): generation (transformers or vLLM, weight
sync into vLLM reported apart), reward, log-probs without gradient (old policy / reference, when the configuration
needs them), other rollout work (tokenizing, image processing, gathers), loss forward, backward (recomputation
under checkpointing included), optimizer step.

FLOPs of one training micro-batch (B sequences padded to T tokens, Tc of them completion; L layers of width d; N
linear weights per layer; V vocabulary; r LoRA rank). The model is frozen but for LoRA, so backward computes
input gradients only (same FLOPs as forward) and no base weight gradients:
  text forward   2·B·T·N·L + 2·B·T²·d·L (causal attention: half of QKᵀ and AV) + 2·B·(Tc+1)·d·V (LM head, completion
                 positions only: TRL passes logits_to_keep) + LoRA 2·B·T·r·(in+out) per adapted matrix
  text backward  the linear and LM-head terms again, attention twice, LoRA twice (input and weight gradients)
  recompute      the decoder layers' forward again (gradient checkpointing) but for each layer's MLP down_proj:
                 torch's non-reentrant checkpoint stops re-running a layer once the last tensor its backward
                 needs is saved again (early stop), and autograd saves a matmul's operands before running it, so
                 the layer's last matmul is never recomputed (tests/test_bench.py checks this on torch's counter)
  vision forward per image of P patches: patch embedding, 32 blocks (qkv, proj, gated MLP; attention over 64-patch
                 windows, or all P patches in the 4 full-attention blocks), the 2x2 merger; no backward: nothing in the
                 tower is trainable and its input needs no gradient
Utilisation (`utilisation`; experiments/vlm-grpo/BENCHMARKS.md "Names and units"): train MFU = (forward + backward
FLOPs) / (loss forward + backward seconds) / the card's datasheet dense bf16 peak (DATASHEET_BF16_DENSE_TFLOPS); train
HFU counts the recomputation too; train HFU vs matmul divides by the bf16 rate measured on the same GPU at the start of
the run (8192³ products); step MFU/HFU use the whole step's seconds (HFU adding no-grad forwards); e2e tok/s/GPU =
prompt + completion tokens trained per step / step seconds. `--refigure` derives these for bench.json files written
before them. `--vllm_stand_in` measures the trainer side of the vLLM path where vLLM is missing (see
install_vllm_stand_in).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "code" / "vlm-grpo"
ACCEL_CONFIG = RECIPE / "deepspeed_zero3.yaml"
HAS_VLLM = importlib.util.find_spec("vllm") is not None

# The seed's grpo_vlm.py flags (experiments/vlm-grpo/README.md), without model and output dir; --max_completion_length
# is set from --completion_length, --use_vllm ... added where vLLM is importable.
SEED_FLAGS = [
    "--learning_rate", "1e-5", "--gradient_checkpointing", "--dtype", "bfloat16",
    "--max_prompt_length", "2048",
    "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
    "--log_completions", "--logging_steps", "200",
]
# 0.3: what the colocate budget in experiments/vlm-grpo/BENCHMARKS.md leaves room for next to ZeRO-3 training.
VLLM_FLAGS = ["--use_vllm", "--vllm_mode", "colocate", "--vllm_gpu_memory_utilization", "0.3"]

# Dense bf16 tensor-core peak per card, TFLOP/s: NVIDIA's datasheets print the 2:4-sparsity figure, twice the dense
# one (H100 SXM and H200 SXM: 1,979; H100 PCIe: 1,513; H100 NVL and H200 NVL: 1,671). The denominator of MFU and HFU;
# the first name contained in torch.cuda.get_device_name() wins, so the PCIe/NVL parts come before the SXM ones.
DATASHEET_BF16_DENSE_TFLOPS = [("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100", 989.4),
                               ("H200", 989.4)]


def datasheet_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in DATASHEET_BF16_DENSE_TFLOPS if key in device_name), None)


# name -> flags added to the seed's. The seed trains 8 completions per GPU per step (2 prompts x 8 generations over 2
# GPUs) and generates them in one batch of 8 per GPU; "tuned" generates 64 per GPU at once (16 per micro-batch x 4
# accumulation steps): transformers' decoding is bound by per-token overhead, so 8x the sequences cost little more
# time, and the larger micro-batch feeds the matrix units better. See experiments/vlm-grpo/BENCHMARKS.md.
CONFIGS = {
    "seed": [],
    # ZeRO-3: attention projections and the vision tower (each < 5 M elements) stay whole on every GPU instead of being
    # all-gathered three times per micro-batch (forward, recomputation, backward); prefetch 50 M elements ahead (about
    # two MLP matrices) instead of accelerate's 3.8 M, less than one.
    "tuned": ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "4",
              "--zero3_param_persistence_threshold", "5000000", "--zero3_prefetch_bucket_size", "50000000"],
}
# The same with TRL's own vLLM-path trainer side (fast_paths.py off): the "before" of issue 11's cuts.
CONFIGS.update({f"{name}-trl": [*flags, "--no_vllm_fast_paths"] for name, flags in list(CONFIGS.items())})


# ---- FLOP count ------------------------------------------------------------------------------------------------


def load_arch(model_dir: Path) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text = {**cfg, **cfg.get("text_config", {})}
    vis = cfg["vision_config"]
    return {
        "d": text["hidden_size"],
        "ff": text["intermediate_size"],
        "L": text["num_hidden_layers"],
        "kv": text["num_key_value_heads"] * (text["hidden_size"] // text["num_attention_heads"]),
        "V": text["vocab_size"],
        "vd": vis["hidden_size"],
        "vff": vis["intermediate_size"],
        "vdepth": vis["depth"],
        "vfull": len(vis.get("fullatt_block_indexes", [])),
        "vout": vis["out_hidden_size"],
        "patch_in": 3 * vis.get("temporal_patch_size", 2) * vis["patch_size"] ** 2,
        "merge": vis["spatial_merge_size"] ** 2,
        "window": (vis["window_size"] // vis["patch_size"]) ** 2,  # patches per attention window (8x8 at 112 px)
    }


def vision_forward_flops(a: dict, patches: int) -> float:
    P, D = patches, a["vd"]
    per_block_linear = 2 * P * (D * 3 * D + D * D + 3 * D * a["vff"])
    windowed = a["vdepth"] - a["vfull"]
    attention = windowed * 4 * P * min(a["window"], P) * D + a["vfull"] * 4 * P * P * D
    merged = P / a["merge"]
    merger = 2 * merged * (a["merge"] * D * a["merge"] * D + a["merge"] * D * a["vout"])
    return 2 * P * a["patch_in"] * D + a["vdepth"] * per_block_linear + attention + merger


def train_flops(a: dict, B: int, T: int, Tc: int, image_patches: list[int], lora_r: int, checkpointing: bool) -> dict:
    d, L = a["d"], a["L"]
    layer_linear = d * (2 * d + 2 * a["kv"]) + 3 * d * a["ff"]
    lora = L * 2 * B * T * lora_r * ((d + d) + (d + a["kv"]))  # q_proj d->d, v_proj d->kv
    decoder_fwd = 2 * B * T * layer_linear * L + 2 * B * T * T * d * L + lora
    head = 2 * B * (Tc + 1) * d * a["V"]
    vision = sum(vision_forward_flops(a, p) for p in image_patches)
    fwd = decoder_fwd + head + vision
    bwd = 2 * B * T * layer_linear * L + 2 * (2 * B * T * T * d * L) + 2 * lora + head
    # early stop (see the module docstring): the recomputation of a layer ends before its last matmul, down_proj
    recompute = decoder_fwd - 2 * B * T * d * a["ff"] * L if checkpointing else 0
    return {"fwd": fwd, "bwd": bwd, "recompute": recompute, "vision": vision}


# ---- worker: one process of `accelerate launch` ----------------------------------------------------------------


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


# ---- a stand-in for vLLM on machines without it: the trainer side of the vLLM path, measured -----------------------


class _SinkModel:
    """vLLM's model as the weight sync sees it: load_weights takes the tensors and does nothing with them while
    training (vLLM's copy into its own weights is not the trainer's cost); `compare_syncs` turns on a per-name sum
    (to check that two syncs hand over the same tensors) and a probe of the ZeRO-3 parameters held whole at each
    hand-off."""

    def __init__(self, torch):
        self.torch, self.sums, self.checking, self.model = torch, {}, False, None
        self.gathered_at_handoff = 0

    def load_weights(self, weights):
        if not self.checking:
            return
        for name, tensor in weights:
            self.sums[name] = float(tensor.sum())
        self.gathered_at_handoff = max(self.gathered_at_handoff, gathered_bytes(self.model))


def gathered_bytes(model) -> int:
    """Bytes of ZeRO-3-partitioned parameters held whole on this rank now (persistent ones excluded: always whole)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel * p.element_size() for p in model.parameters()
               if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE and not getattr(p, "ds_persist", False))


def install_vllm_stand_in(completion_length: int, rec: Recorder) -> None:
    """Make TRL's GRPOTrainer run its vLLM colocate path with the engine replaced: TRL's own VLLMGeneration.sync_weights
    (gather, LoRA merge, name mapping, unmerge) runs unchanged up to the hand-off, where a sink takes the tensors;
    generation returns random completions of exactly `completion_length` tokens (ids below the special tokens) with
    made-up sampling log-probs. Everything after generation (importance-sampling forward, loss, backward, optimizer)
    is TRL's and this recipe's code. For a GPU machine without vLLM (the device machine: see BENCHMARKS.md)."""
    import types

    import torch
    import trl.trainer.grpo_trainer as grpo_trainer
    from trl.generation.vllm_generation import VLLMGeneration

    import grpo_vlm

    grpo_vlm.vllm_importable = lambda: True  # the script's up-front check: vLLM is replaced, not needed

    class StandIn:
        sync_weights = VLLMGeneration.sync_weights
        _fix_param_name_to_vllm = VLLMGeneration._fix_param_name_to_vllm

        def __init__(self, model, accelerator, is_fsdp_enabled, processing_class, mode="colocate", **kwargs):
            self.model, self.accelerator, self.is_fsdp_enabled, self.mode = model, accelerator, is_fsdp_enabled, mode
            self.enable_sleep_mode = kwargs.get("enable_sleep_mode", False)
            self.sink = _SinkModel(torch)
            runner = types.SimpleNamespace(model=self.sink)
            engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=runner)))
            self.llm = types.SimpleNamespace(llm_engine=engine, reset_prefix_cache=lambda: None)
            self.vocab = min(processing_class.tokenizer.all_special_ids)  # ordinary tokens only: none ends a completion
            self.generator = torch.Generator().manual_seed(accelerator.process_index)

        def generate(self, prompts, images=None, num_generations=None, profiler=None, **kwargs):
            ids = torch.randint(0, self.vocab, (len(prompts), completion_length), generator=self.generator).tolist()
            logprobs = [[[-2.0]] * completion_length for _ in prompts]
            return prompts, ids, logprobs, None

    StandIn.generate = rec.timed("vllm_generate", StandIn.generate)
    grpo_trainer.VLLMGeneration = StandIn


def compare_syncs(trainer) -> dict:
    """After training: fast_paths.py's layer-by-layer sync and TRL's whole-model sync of the same weights, one after
    the other in this process (layer by layer first, so nothing TRL's gather leaves behind is counted against it):
    time, peak GPU memory above what was allocated before, the ZeRO-3 parameters held whole at the hand-offs, and
    whether the sink received identical tensors."""
    import gc

    import torch

    gen = trainer.vllm_generation
    gen.sink.checking, gen.sink.model = True, trainer.model
    cuda = torch.cuda.is_available()
    out = {}
    for name, sync in (("layerwise", gen.sync_weights), ("trl", gen.sync_weights.upstream)):
        gen.sink.sums, gen.sink.gathered_at_handoff = {}, 0
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        sync()
        if cuda:
            torch.cuda.synchronize()
        out[name] = {"s": time.perf_counter() - t0, "tensors": len(gen.sink.sums), "sums": gen.sink.sums,
                     "allocated_before_gib": start / 2**30,
                     "peak_extra_gib": (torch.cuda.max_memory_allocated() - start) / 2**30 if cuda else None,
                     "gathered_at_handoff_gib": gen.sink.gathered_at_handoff / 2**30}
    same = out["trl"]["sums"] == out["layerwise"]["sums"]
    for v in out.values():
        del v["sums"]
    gen.sink.checking = False
    return {**out, "identical_tensors": same}


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


# ---- parent: build inputs, run each configuration, report ---------------------------------------------------------


def measure_matmul() -> None:
    """Print the bf16 matmul rate of each visible GPU as JSON (run in a child so the parent holds no CUDA context)."""
    import torch

    n, rates = 8192, []
    for i in range(torch.cuda.device_count()):
        with torch.cuda.device(i):
            a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            for _ in range(5):
                a @ b
            times = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            rates.append({"gpu": i, "name": torch.cuda.get_device_name(i), "tflops": 2 * n**3 / statistics.median(times) / 1e12})
            del a, b
    print(json.dumps(rates))


def measure_vision(model_dir: str, image_side: int, images: int = 16) -> None:
    """Time the vision tower on one micro-batch of images (GPU 0, bf16, no grad): transformers' per-window attention
    loop vs code/vlm-grpo/vision_attention.py's batched form; print both and their difference as JSON."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(RECIPE))
    from vision_attention import enable_batched_vision_attention

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    visual = model.visual.to(device).eval()
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (image_side, image_side, 3), dtype=np.uint8)) for _ in range(images)]
    inputs = processor.image_processor(images=pics, return_tensors="pt")
    pixels, grid = inputs["pixel_values"].to(device, torch.bfloat16), inputs["image_grid_thw"].to(device)
    result, outs = {"images": images, "image_side": image_side, "patches": int(grid.prod(dim=1).sum())}, {}
    for name, batched in (("upstream_loop", False), ("batched", True)):
        enable_batched_vision_attention(batched)
        times = []
        with torch.no_grad():
            for i in range(8):
                sync()
                t0 = time.perf_counter()
                outs[name] = visual(pixels, grid_thw=grid)
                sync()
                if i >= 3:  # the first calls warm up kernels and the allocator
                    times.append(time.perf_counter() - t0)
        result[f"{name}_ms"] = 1e3 * statistics.median(times)
    a, b = outs["upstream_loop"].float(), outs["batched"].float()
    result["max_abs_diff"] = float((a - b).abs().max())
    result["rel_l2_diff"] = float((a - b).norm() / a.norm())
    print(json.dumps(result))


def measure_image_dedupe(model_dir: str, image_side: int, distinct: int = 8, repeats: int = 8) -> None:
    """Time one rollout's image preprocessing as TRL 1.2.0 does it (the chat template with the images, then the
    processor on text and images) for `distinct` images each repeated `repeats` times (num_generations), with the
    processor's own image processor and with fast_paths.py's DedupedImageProcessor; print both as JSON."""
    import numpy as np
    from transformers import AutoProcessor

    sys.path.insert(0, str(RECIPE))
    from fast_paths import DedupedImageProcessor
    from PIL import Image

    processor = AutoProcessor.from_pretrained(model_dir, padding_side="left")
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (image_side, image_side, 3), dtype=np.uint8)) for _ in range(distinct)]
    images = [[pic.copy()] for pic in pics for _ in range(repeats)]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": im[0]}, {"type": "text", "text": "?"}]}]
                     for im in images]
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)

    def rollout():
        processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
        return processor(images=images, text=texts, padding=True, return_tensors="pt")

    result = {"images": len(images), "distinct": distinct, "image_side": image_side, "threads": __import__("torch").get_num_threads()}
    inner = processor.image_processor
    for name in ("upstream", "deduped", "upstream", "deduped"):  # alternated, the second round reported
        if name == "deduped":
            processor.image_processor = DedupedImageProcessor(inner)
        t0 = time.perf_counter()
        out = rollout()
        result[f"{name}_s"] = time.perf_counter() - t0
        result[f"{name}_pixel_sum"] = float(out["pixel_values"].double().sum())
        processor.image_processor = inner
    print(json.dumps(result))


class GpuMemoryPoller:
    """Peak memory.used per GPU as nvidia-smi reports it (context, NCCL buffers and allocator cache included)."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.peak, self._stop = period_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10,
                ).stdout
                for line in out.strip().splitlines():
                    i, used = (int(x) for x in line.split(","))
                    self.peak[i] = max(self.peak.get(i, 0), used)
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def generation_kind(args) -> str:
    if args.vllm_stand_in:
        return "vLLM stand-in (trainer side only: random completions, weight sync into a sink)"
    return "vLLM colocate" if HAS_VLLM else "transformers"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=30).stdout.strip()
        return out.stdout.strip() + (" + uncommitted changes" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        return len([line for line in out.splitlines() if line.startswith("GPU ")])
    except (OSError, subprocess.SubprocessError):
        return 0


def config_argv(name: str, args, model: Path, data: Path, out_dir: Path, gen_yaml: Path) -> list[str]:
    argv = [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out_dir),
        *SEED_FLAGS, "--max_completion_length", str(args.completion_length),
        *(VLLM_FLAGS if HAS_VLLM or args.vllm_stand_in else []),
        *CONFIGS[name],
        "--max_steps", str(args.warmup + args.steps + (1 if name in args.profile_rollout.split(",") else 0)), "--save_strategy", "no", "--report_to", "none",
        "--config", str(gen_yaml),
    ]
    return argv + args.extra


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill the launcher and every rank. Killing the launcher's process group is not enough: torch's elastic agent
    starts each rank in a session of its own, so on the first device run the timed-out seed ranks kept training
    while the next configuration ran beside them on the same GPUs."""
    try:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
    except Exception:  # noqa: BLE001 - psutil missing or the tree already gone: fall back to the group
        pass
    os.killpg(proc.pid, signal.SIGKILL)


def gpu_slices(n_configs: int, num_processes: int, gpus: int, parallel: bool) -> list[list[int]]:
    """Physical GPU indexes of each configuration: all configurations on GPUs 0..num_processes-1 one after another,
    or, with --parallel, each on a disjoint set of num_processes GPUs at the same time."""
    if not parallel:
        return [list(range(num_processes))] * n_configs
    if n_configs * num_processes > gpus:
        raise SystemExit(f"error: --parallel needs {n_configs} configurations x {num_processes} GPUs = "
                         f"{n_configs * num_processes} GPUs, this machine has {gpus}; drop --parallel or "
                         f"pass fewer --configs")
    return [list(range(i * num_processes, (i + 1) * num_processes)) for i in range(n_configs)]


def run_config(name: str, args, model: Path, data: Path, env: dict, gpus: list[int], port: int) -> dict:
    run_dir = Path(args.out) / name
    record_dir = run_dir / "records"
    record_dir.mkdir(parents=True, exist_ok=True)
    for old in record_dir.glob("rank*.jsonl"):
        old.unlink()
    vllm = HAS_VLLM or args.vllm_stand_in
    gen_kwargs = {"min_tokens": args.completion_length} if vllm else {"min_new_tokens": args.completion_length}
    gen_yaml = run_dir / "generation.yaml"
    gen_yaml.write_text(json.dumps({"generation_kwargs": gen_kwargs}) + "\n")  # JSON is YAML
    spec = {"argv": config_argv(name, args, model, data, run_dir / "trainer", gen_yaml), "record_dir": str(record_dir),
            "model": str(model), "vllm_stand_in": args.vllm_stand_in, "completion_length": args.completion_length,
            "profile_step": args.warmup + args.steps + 1 if name in args.profile_rollout.split(",") else None}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    launch = [sys.executable, "-m", "accelerate.commands.launch", f"--config_file={ACCEL_CONFIG}",
              f"--main_process_port={port}"]
    if args.matmul_tflops:  # on a GPU machine: pin this configuration to its GPUs (env has nvidia-smi's numbering)
        env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    if args.num_processes != 2:
        launch += ["--num_processes", str(args.num_processes)]
    cmd = [*launch, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    log_path = Path(args.out) / f"{name}.log"
    print(f"[bench] {name} on GPUs {gpus}: {' '.join(cmd)}\n[bench] {name} script args: {' '.join(spec['argv'])}", flush=True)
    t0 = time.time()
    status = "ok"
    with log_path.open("w") as log, GpuMemoryPoller() as poller:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout_s)
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            proc.wait()
            status = f"timeout after {args.timeout_s} s"
    result = summarize(name, record_dir, args.warmup, args.matmul_tflops, gpus, last=args.warmup + args.steps)
    profile = record_dir / "rollout_profile_rank0.txt"
    if profile.exists():
        result["rollout_profile"] = profile.read_text()
    result.update(status=status, wall_s=round(time.time() - t0, 1), log=str(log_path), script_args=spec["argv"],
                  gpus=gpus, nvidia_smi_peak_mib={i: m for i, m in poller.peak.items() if i in gpus})
    if status != "ok":
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        print(f"[bench] {name}: {status}; log tail:\n" + "\n".join(tail), flush=True)
    return result


def utilisation(flops: dict, train_s: float, step_s: float, tokens_real: float, datasheet: float | None,
                matmul: float | None) -> dict:
    """The utilisation figures of one GPU over the same span (one step, or several added up). `flops`: fwd, bwd and
    recompute of the loss micro-batches, nograd (importance-sampling or reference forwards); `train_s`: loss forward
    + backward seconds; `step_s`: the whole step; `tokens_real`: prompt + completion tokens trained, padding excluded.
    MFU counts the model's FLOPs (forward and backward, no recomputation) against the card's datasheet dense bf16
    peak; HFU counts what the GPU executed (recomputation and no-grad forwards too) against the same peak; the
    measured matmul rate is the third reference. Generation FLOPs are in none of them (EasyR1's "actor MFU" also
    leaves generation out)."""
    model = flops.get("fwd", 0) + flops.get("bwd", 0)
    hardware = model + flops.get("recompute", 0)

    def rate(f, s, peak):
        return f / s / 1e12 / peak if s and peak else None

    return {
        "train_tflops": hardware / train_s / 1e12 if train_s else None,
        "train_mfu": rate(model, train_s, datasheet),
        "train_hfu": rate(hardware, train_s, datasheet),
        "train_hfu_vs_matmul": rate(hardware, train_s, matmul),
        "step_mfu": rate(model, step_s, datasheet),
        "step_hfu": rate(hardware + flops.get("nograd", 0), step_s, datasheet),
        "e2e_tok_s": tokens_real / step_s if step_s else None,
    }


def summarize(name: str, record_dir: Path, warmup: int, matmul: list[dict], gpus: list[int] | None = None,
              last: int | None = None) -> dict:
    """Per-rank records after the warm-up steps -> throughput, utilisation and memory. Rank r ran on physical GPU
    gpus[r], whose name gives the datasheet peak and whose measured matmul rate is the third reference."""
    ranks = {}
    for path in sorted(record_dir.glob("rank*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ranks[int(path.stem[4:])] = [r for r in records if r["step"] > warmup and (last is None or r["step"] <= last)]
    measured = [len(v) for v in ranks.values()]
    if not ranks or not min(measured):
        return {"name": name, "measured_steps": 0}
    n = min(measured)
    per_rank = []
    for rank, records in sorted(ranks.items()):
        records = records[:n]
        phases, counts, phase_mem = {}, {}, {}
        for r in records:
            for k, v in r["phases"].items():
                phases[k] = phases.get(k, 0.0) + v
            for k, v in r["counts"].items():
                counts[k] = counts.get(k, 0.0) + v
            for k, v in r.get("phase_memory", {}).items():
                phase_mem[k] = max(phase_mem.get(k, 0), v)
        interval = sum(r["interval_s"] for r in records)
        fb = phases.get("forward", 0.0) + phases.get("backward", 0.0)
        gpu = gpus[rank] if gpus and rank < len(gpus) else rank
        card = next((m for m in matmul if m["gpu"] == gpu), None)
        flops = {k[6:]: v for k, v in counts.items() if k.startswith("flops_")}
        per_rank.append({
            "rank": rank,
            "gpu": gpu,
            "interval_s": interval,
            "phases_per_step": {k: v / n for k, v in phases.items()},
            "completions_trained": counts.get("completions_trained", 0),
            "generated_tokens": counts.get("generated_tokens", 0),
            "gen_tok_s": counts.get("generated_tokens", 0) / phases["generation"] if phases.get("generation") else None,
            "train_tok_s": counts.get("train_tokens_padded", 0) / fb if fb else None,
            "train_tokens_padded_per_step": counts.get("train_tokens_padded", 0) / n,
            "train_tokens_real_per_step": counts.get("train_tokens_real", 0) / n,
            **utilisation(flops, fb, interval, counts.get("train_tokens_real", 0),
                          datasheet_tflops(card["name"]) if card else None, card["tflops"] if card else None),
            "flops_per_step": {k: v / n for k, v in flops.items()},
            "max_allocated_gib": max(r["memory"].get("max_allocated", 0) for r in records) / 2**30,
            "max_reserved_gib": max(r["memory"].get("max_reserved", 0) for r in records) / 2**30,
            "phase_peak_gib": {k: v / 2**30 for k, v in phase_mem.items()},
            "step_s": [round(r["interval_s"], 2) for r in records],
        })
    step_s = max(r["interval_s"] for r in per_rank) / n  # the slowest rank sets the pace
    completions = sum(r["completions_trained"] for r in per_rank) / n

    def mean(key):
        vals = [r[key] for r in per_rank if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    phase_names = sorted({k for r in per_rank for k in r["phases_per_step"]})
    phases = {k: sum(r["phases_per_step"].get(k, 0.0) for r in per_rank) / len(per_rank) for k in phase_names}
    # The trainer's side of a step: all of it but the generation engine's own work (the weight sync is the trainer's)
    engine = phases.get("vllm_generate", phases.get("generation", 0.0) - phases.get("weight_sync", 0.0))
    trainer_side = step_s - engine
    syncs = {}
    for path in sorted(record_dir.glob("sync_rank*.json")):
        syncs[int(path.stem[9:])] = json.loads(path.read_text())
    return {
        "name": name,
        "measured_steps": n,
        "step_s": step_s,
        "completions_per_step": completions,
        "samples_per_s": completions / step_s,
        "trainer_side_s": trainer_side,
        "trainer_side_s_per_completion": trainer_side / completions if completions else None,
        "e2e_tok_s_per_gpu": sum(r["train_tokens_real_per_step"] for r in per_rank) / len(per_rank) / step_s,
        "gen_tok_s_per_gpu": mean("gen_tok_s"),
        "train_tok_s_per_gpu": mean("train_tok_s"),
        **{k: mean(k) for k in ("train_mfu", "train_hfu", "train_hfu_vs_matmul", "step_mfu", "step_hfu",
                                "train_tflops")},
        "peak_allocated_gib": max(r["max_allocated_gib"] for r in per_rank),
        "peak_reserved_gib": max(r["max_reserved_gib"] for r in per_rank),
        "phase_peak_gib": {k: max(r["phase_peak_gib"].get(k, 0) for r in per_rank)
                           for k in sorted({k for r in per_rank for k in r["phase_peak_gib"]})},
        "phases_per_step": phases,
        "sync_compare": syncs or None,
        "per_rank": per_rank,
    }


def refigure(report: dict, source: str) -> dict:
    """Issue 11's figures for a bench.json written before them (calls 1-3 of 2026-11-26), from the numbers it holds:
    per rank, its FLOPs per step (fwd, bwd, recompute, vision), forward/backward seconds per step, step seconds,
    padded and real tokens per step, and its GPU's name and matmul rate. Its recompute FLOPs were counted with every
    decoder layer's down_proj re-run, which non-reentrant checkpointing never does (tests/test_bench.py), so that term,
    2·d·ff·L per padded token, is taken out first. The raw file is not modified; this is written beside it."""
    from make_tiny_model import PRESETS

    text = PRESETS["3b"]["text"]  # the architecture every device call ran
    down_proj = 2 * text["hidden_size"] * text["intermediate_size"] * text["num_hidden_layers"]
    cards = {m["gpu"]: m for m in report["matmul_bf16"]}
    results = []
    for res in report["results"]:
        ranks = []
        for r in res["per_rank"]:
            card = cards[r["gpu"]]
            flops = dict(r["flops_per_step"])
            flops["recompute"] -= down_proj * r["train_tokens_padded_per_step"]
            ph = r["phases_per_step"]
            step = r["interval_s"] / len(r["step_s"])
            ranks.append({"rank": r["rank"], "gpu": r["gpu"], "card": card["name"],
                          "datasheet_tflops": datasheet_tflops(card["name"]), "matmul_tflops": card["tflops"],
                          **utilisation(flops, ph["forward"] + ph["backward"], step, r["train_tokens_real_per_step"],
                                        datasheet_tflops(card["name"]), card["tflops"])})
        figures = {k: sum(x[k] for x in ranks) / len(ranks) for k in ("train_mfu", "train_hfu", "train_hfu_vs_matmul",
                                                                      "step_mfu", "step_hfu", "train_tflops")}
        results.append({
            "name": res["name"], "step_s": res["step_s"], "samples_per_s": res["samples_per_s"],
            # EasyR1's end-to-end rate: prompt + completion tokens per second per GPU, over the whole step
            "e2e_tok_s_per_gpu": sum(r["train_tokens_real_per_step"] for r in res["per_rank"]) / len(res["per_rank"])
            / res["step_s"],
            **figures, "per_rank": ranks,
        })
    return {"source": source, "derived_by": "scripts/bench.py --refigure " + source, "results": results}


PHASE_ORDER = ["rollout", "generation", "vllm_generate", "weight_sync", "reward", "logps_nograd", "forward",
               "vision_in_forward", "backward", "optimizer"]


def table(results: list[dict]) -> str:
    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    head = ("| config | status | steps | s/step | completions/step | samples/s | trainer-side s/completion | "
            "e2e tok/s/GPU | train TFLOP/s/GPU | train MFU | train HFU | train HFU vs matmul | step MFU | step HFU | "
            "peak alloc GiB | nvidia-smi peak GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        smi = r.get("nvidia_smi_peak_mib") or {}
        lines.append(
            f"| {r['name']} | {r.get('status', '-')} | {r.get('measured_steps', 0)} | {f(r.get('step_s'))} | "
            f"{f(r.get('completions_per_step'), '.0f')} | {f(r.get('samples_per_s'))} | "
            f"{f(r.get('trainer_side_s_per_completion'), '.3f')} | {f(r.get('e2e_tok_s_per_gpu'), '.0f')} | "
            f"{f(r.get('train_tflops'), '.0f')} | {pct(r.get('train_mfu'))} | {pct(r.get('train_hfu'))} | "
            f"{pct(r.get('train_hfu_vs_matmul'))} | {pct(r.get('step_mfu'))} | {pct(r.get('step_hfu'))} | "
            f"{f(r.get('peak_allocated_gib'), '.1f')} | {f(max(smi.values()) / 1024 if smi else None, '.1f')} |"
        )
    lines += ["", "Seconds per optimizer step, mean over GPUs (rollout contains generation, reward, logps_nograd; "
              "generation contains weight_sync and vllm_generate; forward contains vision_in_forward):", ""]
    names = [p for p in PHASE_ORDER if any(p in r.get("phases_per_step", {}) for r in results)]
    lines.append("| config | " + " | ".join(names) + " | step |")
    lines.append("|---|" + "---|" * (len(names) + 1))
    for r in results:
        ph = r.get("phases_per_step", {})
        lines.append(f"| {r['name']} | " + " | ".join(f(ph.get(p)) for p in names) + f" | {f(r.get('step_s'))} |")
    mem = [p for p in PHASE_ORDER if any(p in r.get("phase_peak_gib", {}) for r in results)]
    if mem:
        lines += ["", "Peak GPU memory allocated during each phase, GiB (max over GPUs and steps; `+` = above what was "
                  "allocated when the phase began):", ""]
        lines.append("| config | " + " | ".join(mem) + " |")
        lines.append("|---|" + "---|" * len(mem))
        for r in results:
            pk = r.get("phase_peak_gib", {})
            lines.append(f"| {r['name']} | " + " | ".join(
                f"{f(pk.get(p), '.1f')} (+{f(pk.get(p + '_extra'), '.1f')})" for p in mem) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench", help="folder for the model, data, logs and results")
    parser.add_argument("--model", default=None, help="model folder (default: OUT/model-PRESET, built if missing)")
    parser.add_argument("--preset", default="3b", choices=["3b", "tiny"], help="architecture of the built model")
    parser.add_argument("--configs", default="seed,tuned", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before measuring (compilation, allocator)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per configuration")
    parser.add_argument("--completion_length", type=int, default=1024, help="every completion has exactly this many tokens (seed: 1024)")
    parser.add_argument("--image_side", type=int, default=448, help="side of the synthetic images, pixels")
    parser.add_argument("--rows", type=int, default=512, help="rows of the synthetic dataset")
    parser.add_argument("--timeout_s", type=int, default=1800, help="per configuration; partial steps are still reported")
    parser.add_argument("--num_processes", type=int, default=None,
                        help="GPUs per configuration (default: all GPUs, or 2 on CPU; 2 with --parallel)")
    parser.add_argument("--parallel", action="store_true",
                        help="run the configurations at the same time, each on its own num_processes GPUs (a 4-GPU "
                             "machine runs seed and tuned side by side); the default runs them one after another")
    parser.add_argument("--vllm_stand_in", action="store_true",
                        help="where vLLM is missing (the device machine): run TRL's vLLM colocate path with the engine "
                             "replaced by a stand-in (random fixed-length completions; the weight sync runs up to the "
                             "hand-off, into a sink): the trainer side of the vLLM path, measured")
    parser.add_argument("--skip_vision", action="store_true", help="skip the vision-tower timing child")
    parser.add_argument("--profile_rollout", default="", metavar="CONFIGS",
                        help="comma-separated configurations that run one more step after the measured ones, its "
                             "rollout profiled on rank 0 (cProfile); the profile goes into bench.json")
    parser.add_argument("--refigure", metavar="BENCH_JSON",
                        help="write BENCH_JSON's issue-11 figures (MFU, HFU, step utilisation, e2e tokens/s) beside it "
                             "as *.figures.json, from the numbers it holds, and exit")
    parser.add_argument("--results_copy_dir", default=os.environ.get("FLEXAI_OUTPUT_CHECKPOINT_DIR"),
                        help="also write bench.json and bench.md here (default: FLEXAI_OUTPUT_CHECKPOINT_DIR, so a "
                             "FlexAI job's results come back with `make flexai-fetch`, without the model and data)")
    parser.add_argument("--image_dedupe", metavar="MODEL_DIR",
                        help="time one rollout's image preprocessing with and without fast_paths.py's per-image "
                             "dedupe (8 distinct images x 8 generations, --image_side px), print JSON, exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vision", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="grpo_vlm.py flags added to every configuration (after --)")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.matmul:
        return measure_matmul()
    if args.vision:
        return measure_vision(args.vision, args.image_side)
    if args.image_dedupe:
        return measure_image_dedupe(args.image_dedupe, args.image_side)
    if args.refigure:
        src = Path(args.refigure)
        rel = os.path.relpath(src.resolve(), REPO)
        derived = refigure(json.loads(src.read_text()), rel)
        dest = src.with_name(src.stem + ".figures.json")
        dest.write_text(json.dumps(derived, indent=1) + "\n")
        print(f"[bench] {dest}")
        return None

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    gpus = gpu_count()
    args.num_processes = args.num_processes or (2 if args.parallel or not gpus else gpus)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown --configs {unknown}; choose from {sorted(CONFIGS)}")
    slices = gpu_slices(len(names), args.num_processes, gpus, args.parallel and bool(gpus))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    # NVLink multicast stays off on the device hosts (KINDS.md: it can put shared GPUs out of service).
    env.update({k: env.get(k, v) for k, v in
                {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items()})
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's GPU numbers = nvidia-smi's, for --parallel and the memory poller

    t0 = time.time()
    args.matmul_tflops = []
    if gpus:
        res = subprocess.run([sys.executable, __file__, "--matmul"], capture_output=True, text=True, env=env, check=True)
        args.matmul_tflops = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"[bench] bf16 matmul 8192^3: {args.matmul_tflops}", flush=True)

    model = Path(args.model) if args.model else out / f"model-{args.preset}"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts/make_tiny_model.py"), str(model), "--preset", args.preset,
                        "--device", "cuda" if gpus else "cpu"], check=True, env=env)
    data = out / f"synthetic-{args.image_side}px-{args.rows}"
    if not (data / "dataset_info.json").exists():
        sys.path.insert(0, str(RECIPE))
        from synthetic_data import make_synthetic_dataset

        make_synthetic_dataset(args.rows, seed=0, image_side=args.image_side).save_to_disk(str(data))
    args.vision_tower = None
    if gpus and not args.skip_vision:
        res = subprocess.run([sys.executable, __file__, "--vision", str(model), "--image_side", str(args.image_side)],
                             capture_output=True, text=True, env=env)
        if res.returncode == 0:
            args.vision_tower = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"[bench] vision tower, 16 images: {args.vision_tower or res.stderr[-2000:]}", flush=True)
    print(f"[bench] model and data ready after {time.time() - t0:.0f} s; generation: "
          f"{generation_kind(args)}; completions fixed at {args.completion_length} tokens", flush=True)

    results: list[dict] = []
    lock = threading.Lock()

    def run_one(i: int, name: str) -> None:
        result = run_config(name, args, model, data, env, slices[i], port=29500 + i)
        with lock:
            results.append(result)
            results.sort(key=lambda r: names.index(r["name"]))
            print(table(results), flush=True)
            report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": sys.argv,
                      "versions": versions(), "matmul_bf16": args.matmul_tflops, "vision_tower": args.vision_tower,
                      "generation": generation_kind(args), "parallel": args.parallel, "commit": git_commit(),
                      "completion_length": args.completion_length, "image_side": args.image_side, "results": results}
            (out / "bench.json").write_text(json.dumps(report, indent=1))
            (out / "bench.md").write_text(table(results) + "\n")
            if args.results_copy_dir:
                copy_dir = Path(args.results_copy_dir)
                copy_dir.mkdir(parents=True, exist_ok=True)
                for name in ("bench.json", "bench.md"):
                    (copy_dir / name).write_bytes((out / name).read_bytes())

    if args.parallel and gpus:
        threads = [threading.Thread(target=run_one, args=(i, n)) for i, n in enumerate(names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, name in enumerate(names):
            run_one(i, name)
    by_name = {r["name"]: r for r in results}
    if by_name.get("seed", {}).get("samples_per_s") and len(results) > 1:
        for r in results:
            if r["name"] != "seed" and r.get("samples_per_s"):
                ratio = r["samples_per_s"] / by_name["seed"]["samples_per_s"]
                print(f"[bench] samples/s {r['name']} / seed = {ratio:.2f}x", flush=True)
    (out / "bench.md").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
