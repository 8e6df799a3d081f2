"""The fit check's published numbers (issue 20), written as raw files that BENCHMARKS.md and the guide quote.

    python scripts/fit_report.py --calibration   # bench-results/fit-calibration.json: estimate vs every measured peak
    python scripts/fit_report.py --table         # bench-results/fit-table.json: family x size x card, fits or not

Both run offline on a CPU in seconds: the models are built on PyTorch's meta device from the literal configs below
(no weights, no download), and the estimate is code/vlm-grpo/fit_check.py's, the one `--dry_run` prints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code" / "vlm-grpo"))
sys.path.insert(0, str(REPO / "scripts"))

import fit_check  # noqa: E402
import model_presets  # noqa: E402

RESULTS = REPO / "experiments" / "vlm-grpo" / "bench-results"
CALIBRATION = RESULTS / "fit-calibration.json"
TABLE = RESULTS / "fit-table.json"

# The real checkpoints, sized by the presets of their architectures in scripts/model_presets.py (the one place their
# config.json values are written; each names where its values were read). The checkpoints cannot be downloaded here;
# tests/test_fit_check.py checks that transformers builds each with the parameter count the model card publishes.
ARCHITECTURES = {
    "Qwen2-VL-2B": dict(family="qwen2-vl", preset="2b", source="Qwen/Qwen2-VL-2B-Instruct config.json"),
    "Qwen2-VL-7B": dict(family="qwen2-vl", preset="7b", source="Qwen/Qwen2-VL-7B-Instruct config.json"),
    "Qwen2.5-VL-3B": dict(family="qwen2.5-vl", preset="3b",
                          source="Qwen/Qwen2.5-VL-3B-Instruct config.json (scripts/make_tiny_model.py --preset 3b, "
                                 "the benchmarks' model)"),
    "Qwen2.5-VL-7B": dict(family="qwen2.5-vl", preset="7b", source="Qwen/Qwen2.5-VL-7B-Instruct config.json"),
    "Qwen2.5-VL-32B": dict(family="qwen2.5-vl", preset="32b", source="Qwen/Qwen2.5-VL-32B-Instruct config.json"),
    "Qwen3-VL-2B": dict(family="qwen3-vl", preset="2b",
                        source="Qwen/Qwen3-VL-2B-Instruct config.json (as mirrored by pytorch/torchtitan's qwen3_vl "
                               "'2B' flavor)"),
    "Qwen3-VL-4B": dict(family="qwen3-vl", preset="4b", source="Qwen/Qwen3-VL-4B-Instruct config.json"),
    "Qwen3-VL-8B": dict(family="qwen3-vl", preset="8b", source="Qwen/Qwen3-VL-8B-Instruct config.json"),
}

# The seed command's flags, as far as memory goes (grpo_vlm.py's docstring; TRL 1.2.0's defaults where it sets none).
SEED_FLAGS = dict(processes=2, micro_batch=8, gradient_accumulation_steps=1, completion_tokens=1024,
                  generation="vllm-colocate", vllm_gpu_memory_utilization=0.3, vllm_tensor_parallel_size=1,
                  gradient_checkpointing=True, lora_target_modules=["q_proj", "v_proj"], lora_r=16)
# Prompt text of the benchmarks' synthetic rows: 442 tokens with a 448-px image of 256 tokens (BENCHMARKS.md).
PROMPT_TEXT_TOKENS = 442 - 256
TABLE_IMAGE_SIDE = 512  # --max_image_side's default: the largest image a default run trains on


def config_of(name: str):
    from transformers import AutoConfig

    spec = model_presets.size_config(ARCHITECTURES[name]["family"], ARCHITECTURES[name]["preset"])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def facts_of(name: str, persistence_threshold: int | None = None, targets=("q_proj", "v_proj"), r: int = 16):
    return fit_check.model_facts(config_of(name), name=name, lora_target_modules=list(targets), lora_r=r,
                                 persistence_threshold=persistence_threshold)


def seed_shape(name: str, gpu_memory_gib: float, config=None) -> fit_check.RunShape:
    config = config or config_of(name)
    image = fit_check.tokens_per_image_side(config, TABLE_IMAGE_SIDE)
    flags = {k: v for k, v in SEED_FLAGS.items() if not k.startswith("lora")}
    return fit_check.RunShape(gpu_memory_gib=gpu_memory_gib, prompt_tokens=PROMPT_TEXT_TOKENS + image,
                              image_tokens=image, generation_batch=flags["micro_batch"], **flags)


# ---- calibration -------------------------------------------------------------------------------------------------


def _flag(args: list[str], name: str, default=None):
    return args[args.index(name) + 1] if name in args else default


def calibration() -> dict:
    """Estimate vs measured for every result of every raw bench file: the trainer's allocated peak (no vLLM pool,
    no CUDA context: the stand-in engine allocates nothing) against torch's max_memory_allocated."""
    rows = []
    config = config_of("Qwen2.5-VL-3B")
    facts_by_threshold = {}
    for path in sorted(RESULTS.glob("*.json")):
        raw = json.loads(path.read_text())
        if path.name.startswith("fit-") or path.name.endswith(".figures.json"):
            continue
        if "results" not in raw:
            if "nvidia_smi_peak_mib" in raw:
                rows.append(_smi_only_row(path, raw, config, facts_by_threshold))
            continue
        gpu = raw["matmul_bf16"][0]["name"]
        for result in raw["results"]:
            args = result["script_args"]
            threshold = _flag(args, "--zero3_param_persistence_threshold")
            threshold = int(threshold) if threshold else None
            if threshold not in facts_by_threshold:
                facts_by_threshold[threshold] = facts_of("Qwen2.5-VL-3B", threshold)
            processes = len(result["gpus"])
            micro = int(_flag(args, "--per_device_train_batch_size", 8))
            accumulate = int(_flag(args, "--gradient_accumulation_steps", 1))
            completions_per_gpu = result["completions_per_step"] / processes
            rank = result["per_rank"][0]
            tokens = math.ceil(rank["train_tokens_padded_per_step"] / completions_per_gpu)
            completion = int(_flag(args, "--max_completion_length"))
            image = fit_check.tokens_per_image_side(config, raw["image_side"])
            run = fit_check.RunShape(
                processes=processes, gpu_memory_gib=141, micro_batch=micro, prompt_tokens=tokens - completion,
                completion_tokens=completion, image_tokens=image, generation_batch=micro * accumulate,
                gradient_checkpointing="--gradient_checkpointing" in args,
                generation="vllm-colocate" if "--use_vllm" in args else "transformers",
                vllm_gpu_memory_utilization=float(_flag(args, "--vllm_gpu_memory_utilization", 0.3)),
                gradient_accumulation_steps=accumulate)
            est = fit_check.estimate(facts_by_threshold[threshold], run)
            measured = result["peak_allocated_gib"]
            rows.append({
                "raw": f"bench-results/{path.name}",
                "config": result["name"],
                "gpu": f"{processes}x {gpu}",
                "generation": "vLLM stand-in (engine allocates nothing)" if "--use_vllm" in args else "transformers",
                "micro_batch": micro,
                "sequence_tokens": tokens,
                "persistence_threshold": threshold,
                "measured_allocated_gib": round(measured, 2),
                "measured_reserved_gib": round(result["peak_reserved_gib"], 2),
                "nvidia_smi_gib": round(max(result["nvidia_smi_peak_mib"].values()) / 1024, 2),
                "estimate_gib": round(est.trainer_gib, 2),
                "error_pct": round(100 * (est.trainer_gib - measured) / measured, 1),
                "peak_phase": est.phase,
                "terms_gib": {k: round(v, 2) for k, v in est.counted.items() if k not in (fit_check.VLLM_POOL,
                                                                                             fit_check.CONTEXT)},
            })
    allocated = [r for r in rows if r["measured_allocated_gib"] is not None]
    return {
        "what": "fit_check.py's estimate of the trainer's allocated peak per GPU against every measured "
                "peak_allocated_gib of the raw bench files (Qwen2.5-VL-3B architecture, random weights)",
        "command": "python scripts/fit_report.py --calibration",
        "rows": rows,
        "max_abs_error_pct": max(abs(r["error_pct"]) for r in allocated),
    }


def _smi_only_row(path: Path, raw: dict, config, facts_by_threshold) -> dict:
    """A run that recorded only nvidia-smi's peak (the torchrun route): compared with the estimate plus the CUDA
    context, which still leaves out the allocator's cache that nvidia-smi also counts."""
    args = raw["command"].split()
    processes = int(_flag(args, "--nproc_per_node"))
    micro = int(_flag(args, "--per_device_train_batch_size", 8))
    completion = int(_flag(args, "--max_completion_length"))
    image = fit_check.tokens_per_image_side(config, 112)  # `--dataset_name synthetic`: 112-px images
    run = fit_check.RunShape(
        processes=processes, gpu_memory_gib=141, micro_batch=micro, prompt_tokens=PROMPT_TEXT_TOKENS + image,
        completion_tokens=completion, image_tokens=image, generation_batch=micro,
        gradient_checkpointing="--gradient_checkpointing" in args, generation="transformers")
    facts_by_threshold.setdefault(None, facts_of("Qwen2.5-VL-3B"))
    est = fit_check.estimate(facts_by_threshold[None], run)
    smi = max(raw["nvidia_smi_peak_mib"].values()) / 1024
    with_context = est.trainer_gib + est.terms[fit_check.CONTEXT]
    return {
        "raw": f"bench-results/{path.name}",
        "config": "seed flags, --max_completion_length 256, transformers generation (torchrun route)",
        "gpu": f"{processes}x NVIDIA H200",
        "generation": "transformers",
        "micro_batch": micro,
        "sequence_tokens": run.prompt_tokens + completion,
        "persistence_threshold": None,
        "measured_allocated_gib": None,
        "measured_reserved_gib": None,
        "nvidia_smi_gib": round(smi, 2),
        "estimate_gib": round(with_context, 2),
        "error_pct": round(100 * (with_context - smi) / smi, 1),
        "peak_phase": est.phase,
        "terms_gib": {k: round(v, 2) for k, v in est.counted.items() if k != fit_check.VLLM_POOL},
        "note": "only nvidia-smi's peak was recorded: compared with the estimate plus the CUDA context; the "
                "allocator's cache, which nvidia-smi also counts, is not in the estimate. Prompt tokens assumed: "
                f"{PROMPT_TEXT_TOKENS} text + {image} image (112-px synthetic images)",
    }


# ---- the table ---------------------------------------------------------------------------------------------------


# The guide's tuned flags (BENCHMARKS.md "What the tuned configuration changes"), beside the seed's.
TUNED_FLAGS = dict(micro_batch=16, gradient_accumulation_steps=4)
TUNED_PERSISTENCE = 5000000


def table() -> dict:
    rows = []
    for name, spec in ARCHITECTURES.items():
        config = config_of(name)
        facts = {
            "seed": fit_check.model_facts(config, name=name, lora_target_modules=SEED_FLAGS["lora_target_modules"],
                                          lora_r=SEED_FLAGS["lora_r"]),
            "tuned": fit_check.model_facts(config, name=name, lora_target_modules=SEED_FLAGS["lora_target_modules"],
                                           lora_r=SEED_FLAGS["lora_r"], persistence_threshold=TUNED_PERSISTENCE),
        }
        row = {"model": name, "source": spec["source"], "parameters": facts["seed"].parameters,
               "tied_head": facts["seed"].tied_head, "prompt_tokens": seed_shape(name, 80, config).prompt_tokens,
               "configs": {}}
        for label in ("seed", "tuned"):
            row["configs"][label] = {}
            for gb in fit_check.CARDS_GB:
                run = seed_shape(name, gb, config)
                if label == "tuned":
                    batch = TUNED_FLAGS["micro_batch"] * TUNED_FLAGS["gradient_accumulation_steps"]
                    run = replace(run, generation_batch=batch, **TUNED_FLAGS)
                est = fit_check.estimate(facts[label], run)
                fix = fit_check.make_it_fit(facts[label], run)
                row["configs"][label][f"2x{gb}GB"] = {
                    "per_gpu_gib": round(est.total_gib, 1),
                    "largest_term": est.largest[0],
                    "largest_gib": round(est.largest[1], 1),
                    "fits": est.fits,
                    "tight": est.tight,
                    "pool_too_small": est.pool_too_small,
                    "make_it_fit": fit_check.flags_text(fix) if fix else ("" if fix == {} else "not with up to 8 GPUs"),
                }
        rows.append(row)
    refused_run = seed_shape("Qwen2.5-VL-32B", 80)
    refused = fit_check.refusal(fit_check.estimate(facts_of("Qwen2.5-VL-32B"), refused_run))
    return {
        "what": "per-GPU estimate of each architecture on 2 GPUs of 80 GB and of 141 GB, and the smallest change that "
                "fits. seed: the seed command's flags (8 completions per GPU of 1024 tokens in one micro-batch, vLLM "
                "colocate at 0.3, LoRA r=16 on q_proj v_proj, gradient checkpointing); tuned: the guide's "
                "--per_device_train_batch_size 16 --gradient_accumulation_steps 4 --zero3_param_persistence_threshold "
                f"{TUNED_PERSISTENCE} on top. Prompt: a {TABLE_IMAGE_SIDE}-px image (--max_image_side's default) + "
                f"{PROMPT_TEXT_TOKENS} text tokens",
        "command": "python scripts/fit_report.py --table",
        "rows": rows,
        "refused": {"model": "Qwen2.5-VL-32B", "gpus": "2x80GB", "config": "seed", "line": f"error: {refused}"},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", action="store_true", help=f"write {CALIBRATION.relative_to(REPO)}")
    parser.add_argument("--table", action="store_true", help=f"write {TABLE.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if not (args.calibration or args.table):
        parser.error("give --calibration and/or --table")
    if args.calibration:
        CALIBRATION.write_text(json.dumps(calibration(), indent=1) + "\n")
        print(CALIBRATION)
    if args.table:
        TABLE.write_text(json.dumps(table(), indent=1) + "\n")
        print(TABLE)


if __name__ == "__main__":
    main()
