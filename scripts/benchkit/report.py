"""From the per-rank records to the report: throughput, utilisation and memory per configuration (`summarize`), the
Markdown tables of bench.md (`table`), and the figures of bench.json files written before them (`refigure`)."""

from __future__ import annotations

import json
from pathlib import Path

from .flops import datasheet_tflops, utilisation


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
    from model_presets import PRESETS

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
