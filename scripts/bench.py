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
its entry point (`--worker`), which wraps trainer methods with timers before calling the script's stages. The parts,
one concern each, are in scripts/benchkit/ (its __init__.py lists them).

Fixed completion length: random weights almost never emit EOS, but "almost" would still make runs differ, so every
completion is forced to exactly --completion_length tokens (`min_new_tokens` for transformers; `min_tokens` for
vLLM), passed as generation_kwargs through a `--config` YAML (the CLI cannot take a dict for it).

Phases (seconds per optimizer step, CUDA-synchronized at each boundary): generation (transformers or vLLM, weight
sync into vLLM reported apart), reward, log-probs without gradient (old policy / reference, when the configuration
needs them), other rollout work (tokenizing, image processing, gathers), loss forward, backward (recomputation
under checkpointing included), optimizer step.

FLOPs of one training micro-batch (forward, backward, recomputation, vision tower): benchkit/flops.py states them.

Utilisation (benchkit/flops.py's `utilisation`; experiments/vlm-grpo/BENCHMARKS.md "Names and units"): train MFU = (forward + backward
FLOPs) / (loss forward + backward seconds) / the card's datasheet dense bf16 peak (DATASHEET_BF16_DENSE_TFLOPS); train
HFU counts the recomputation too; train HFU vs matmul divides by the bf16 rate measured on the same GPU at the start of
the run (8192³ products); step MFU/HFU use the whole step's seconds (HFU adding no-grad forwards); e2e tok/s/GPU =
prompt + completion tokens trained per step / step seconds. `--refigure` derives these for bench.json files written
before them. `--vllm_stand_in` measures the trainer side of the vLLM path where vLLM is missing (see
benchkit/vllm_stand_in.py).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchkit import REPO
from benchkit.micro import measure_image_dedupe, measure_matmul, measure_vision
from benchkit.report import refigure
from benchkit.runner import CONFIGS, run_benchmark
from benchkit.worker import worker


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
                        help="where vLLM is missing (a GPU host with another torch): run TRL's vLLM colocate path with the engine "
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
    run_benchmark(args)


if __name__ == "__main__":
    main()
