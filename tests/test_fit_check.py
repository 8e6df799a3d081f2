"""The fit check of `--dry_run` (code/vlm-grpo/fit_check.py, issue 20): its arithmetic against estimates worked out by
hand, the one-line refusal and the warning within 10 % of the card through the script's own arguments, the literal
architectures against the parameter counts their model cards publish, and the calibration and fit tables of the docs
against the raw files scripts/fit_report.py writes. All in-process, no training: a few seconds."""

from __future__ import annotations

import json
import math
import re

import pytest

import fit_check
import fit_report
from fit_check import ModelFacts, RunShape, estimate
from grpo_vlm import ConfigError, parse_args

from _tiny import REPO

EXP = REPO / "experiments" / "vlm-grpo"
BENCHMARKS = EXP / "BENCHMARKS.md"
GUIDE = EXP / "README.md"
CALIBRATION = EXP / "bench-results" / "fit-calibration.json"
TABLE = EXP / "bench-results" / "fit-table.json"

# Qwen2.5-VL-3B's shapes with round ZeRO-3 numbers: the seed's micro-batch of 8 sequences, 442 prompt tokens (a
# 448-px image, 256 tokens = 1,024 patches) + 1,024 completion tokens, 2 GPUs of 80 GB, vLLM colocated at 0.3.
FACTS_3B = ModelFacts(
    name="3b-like", parameters=3_754_622_976, persistent_parameters=1_000_000, gathered_parameters=1_000_000_000,
    lora_parameters=3_686_400, hidden_size=2048, num_layers=36, intermediate_size=11008, vocab_size=151936,
    kv_bytes_per_token=36 * 2 * 2 * 128 * 2, vision_hidden_size=1280, vision_intermediate_size=3420,
    patches_per_token=4, tied_head=True)
SEED_3B = RunShape(processes=2, gpu_memory_gib=80, micro_batch=8, prompt_tokens=442, completion_tokens=1024,
                   image_tokens=256, generation_batch=8)


def test_the_seed_shape_by_hand():
    est = estimate(FACTS_3B, SEED_3B)
    gib = 2**30
    # by hand, bytes: bf16 shards over 2 GPUs; persistent tensors whole (half of them beyond the own shard); 1e9
    # gathered elements in bf16; LoRA at 18 bytes over 2 GPUs; 8 x 1,466 tokens x 2,048 x bf16 at 36 layer
    # boundaries; 2 x 8 x 1,024 x 151,936 x fp32 logits; then vLLM's 0.3 x 80 GiB and 2.2 GiB of CUDA context.
    by_hand = {
        fit_check.SHARDS: 3_754_622_976 * 2 / 2 / gib,  # 3.497
        fit_check.PERSISTENT: 1_000_000 * 2 * 0.5 / gib,  # 0.001
        fit_check.GATHERED: 1_000_000_000 * 2 / gib,  # 1.863
        fit_check.LORA: 3_686_400 * 18 / 2 / gib,  # 0.031
        fit_check.ACTIVATIONS: 8 * 1466 * 2048 * 2 * 36 / gib,  # 1.611
        fit_check.LOGITS: 2 * 8 * 1024 * 151936 * 4 / gib,  # 9.273
        fit_check.VISION: 8 * 256 * 4 * (8 * 1280 + 3 * 3420) * 2 / gib,  # 0.313: below the loss phase, not counted
        fit_check.VLLM_POOL: 24.0,
        fit_check.CONTEXT: 2.2,
    }
    assert est.terms == pytest.approx(by_hand)
    assert est.phase == "loss"
    assert est.total_gib == pytest.approx(42.4753, abs=1e-4)  # every term above but the vision tower's
    assert est.largest == (fit_check.VLLM_POOL, 24.0)
    assert est.trainer_gib == pytest.approx(42.4753 - 24 - 2.2, abs=1e-4)  # what torch's allocated peak measures
    assert est.fits and not est.tight and not est.pool_too_small
    # vLLM's pool must hold bf16 weights, one 1,466-token sequence's KV cache and the 2 GiB reserve: 9.03 GiB
    assert est.vllm_weights_gib == pytest.approx((3_754_622_976 * 2 + 1466 * 36864) / gib + 2, abs=1e-6)


def test_transformers_generation_without_checkpointing_by_hand():
    """8 B parameters on 4 GPUs, one short sequence per micro-batch, no gradient checkpointing, no vLLM: generating
    with the whole model gathered outweighs the loss."""
    facts = ModelFacts(
        name="8b-like", parameters=8_000_000_000, persistent_parameters=0, gathered_parameters=1_000_000_000,
        lora_parameters=0, hidden_size=4096, num_layers=32, intermediate_size=14336, vocab_size=32000,
        kv_bytes_per_token=131072, vision_hidden_size=1024, vision_intermediate_size=4096, patches_per_token=4,
        tied_head=False)
    run = RunShape(processes=4, gpu_memory_gib=141, micro_batch=1, prompt_tokens=100, completion_tokens=100,
                   image_tokens=0, generation_batch=64, gradient_checkpointing=False, generation="transformers")
    est = estimate(facts, run)
    gib = 2**30
    # by hand: loss phase = 200 tokens x 32 layers x (8 x 4,096 + 4 x 14,336) x bf16 + 2 x 100 x 32,000 x fp32 =
    # 1.098 GiB; generation phase = 8e9 x bf16 + 64 x 200 tokens x 128 KiB of KV = 16.46 GiB
    assert est.terms[fit_check.ACTIVATIONS_FULL] == pytest.approx(200 * 32 * (8 * 4096 + 4 * 14336) * 2 / gib)
    assert est.terms[fit_check.GENERATION] == pytest.approx((8e9 * 2 + 64 * 200 * 131072) / gib)
    assert est.phase == "generation"
    assert fit_check.VLLM_POOL not in est.terms
    assert est.total_gib == pytest.approx(24.2516, abs=1e-4)  # (4e9 + 2e9 + 17.678e9 bytes) / 2^30 + 2.2
    assert est.largest[0] == fit_check.GENERATION


def test_a_run_that_cannot_fit_is_refused_in_one_line_naming_its_largest_term():
    """64 completions per micro-batch: 74 GiB of logits on an 80 GB card. The control, the seed's 8, fits."""
    big = estimate(FACTS_3B, RunShape(**{**SEED_3B.__dict__, "micro_batch": 64}))
    assert big.terms[fit_check.LOGITS] == pytest.approx(2 * 64 * 1024 * 151936 * 4 / 2**30)  # 74.2
    assert not big.fits
    line = fit_check.refusal(big)
    assert "\n" not in line
    assert "largest term: logits of the loss micro-batch 74.2 GiB" in line
    assert "--per_device_train_batch_size" in line and "--max_completion_length" in line  # the two flags
    assert "over the card" in line
    assert estimate(FACTS_3B, SEED_3B).fits  # control


def test_make_it_fit_keeps_the_completions_per_step():
    big = RunShape(**{**SEED_3B.__dict__, "micro_batch": 64})
    fix = fit_check.make_it_fit(FACTS_3B, big)
    # 128 completions per step stay 128: by hand, a micro-batch of 32 needs 37.09 GiB of logits and 6.44 of
    # activations, 75.1 GiB in all (94 %: fits, but within 10 % of the card); 16 needs 18.55 + 3.22, 53.4 GiB (67 %)
    assert fix == {"--per_device_train_batch_size": 16, "--gradient_accumulation_steps": 4}
    assert fit_check.make_it_fit(FACTS_3B, SEED_3B) == {}


def test_vllm_pool_too_small_for_the_weights_is_refused():
    """TRL's default --vllm_gpu_memory_utilization 0.3 on a 32 GB card: 9.6 GiB of pool for 9.0 GiB of needs fits;
    on a 24 GB card 7.2 GiB does not, whatever the rest."""
    assert not estimate(FACTS_3B, RunShape(**{**SEED_3B.__dict__, "gpu_memory_gib": 32})).pool_too_small
    small = estimate(FACTS_3B, RunShape(**{**SEED_3B.__dict__, "gpu_memory_gib": 24}))
    assert small.pool_too_small and not small.fits
    line = fit_check.refusal(small)
    assert "vLLM's pool (7.2 GiB = 0.3 x 24) cannot hold its weights and reserve (9.0 GiB" in line
    assert "--vllm_tensor_parallel_size" in line and "--vllm_gpu_memory_utilization" in line


# ---- through the script's arguments: the dry run's check -----------------------------------------------------------


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    """config.json only (all the check reads) of the real Qwen2.5-VL-3B and -32B architectures."""
    dirs = {}
    for name in ("Qwen2.5-VL-3B", "Qwen2.5-VL-32B"):
        out = tmp_path_factory.mktemp(name)
        fit_report.config_of(name).save_pretrained(out)
        dirs[name] = out
    return dirs


def _seed_args(model_dir, *extra):
    # the seed's flags; outside `accelerate launch`: 1 process, and no data survey (prompts of --max_prompt_length)
    return parse_args(["--model_name_or_path", str(model_dir), "--output_dir", "unused-out", "--learning_rate", "1e-5",
                       "--gradient_checkpointing", "--dtype", "bfloat16", "--max_prompt_length", "2048",
                       "--max_completion_length", "1024", "--use_vllm", "--vllm_mode", "colocate", "--use_peft",
                       "--lora_target_modules", "q_proj", "v_proj", *extra])


def test_the_dry_run_check_reports_the_seed_on_80_and_141_gb_cards(config_dirs):
    report = fit_check.check_fit(*_seed_args(config_dirs["Qwen2.5-VL-3B"]), None)
    assert report["gpu_memory_gb"] == 80 and report["processes"] == 1
    assert set(report["cards"]) == {"1x80GB", "1x141GB", "2x80GB", "2x141GB"}
    assert report["cards"]["2x80GB"]["verdict"].endswith("(largest term: vLLM's pool 24.0 GiB): fits")
    assert report["cards"]["2x141GB"]["fits"]


def test_the_dry_run_refuses_the_32b_with_the_seeds_flags(config_dirs):
    with pytest.raises(ConfigError) as err:
        fit_check.check_fit(*_seed_args(config_dirs["Qwen2.5-VL-32B"]), None)
    line = str(err.value)
    assert "\n" not in line
    assert "on 1 x 80 GB (largest term: ZeRO-3 shards of the base 62.3 GiB)" in line
    assert "vLLM's pool (24.0 GiB = 0.3 x 80) cannot hold its weights" in line


@pytest.mark.parametrize("card,verdict", [(30, "refused"), (36, "warned"), (45, "quiet")])
def test_the_dry_run_warns_within_10_percent_of_the_card(config_dirs, caplog, card, verdict):
    """The seed on the 3B architecture in one process: 23.75 GiB + 0.3 x the card (by hand: shards 6.99, gathered
    1.86, LoRA 0.06, activations 8 x 3,072 x 2,048 x bf16 x 36 = 3.375, logits 9.27, context 2.2), so 32.75 of 30
    GiB (over), 34.55 of 36 (96 %: warned) and 37.25 of 45 (83 %: quiet)."""
    args = _seed_args(config_dirs["Qwen2.5-VL-3B"], "--gpu_memory_gb", str(card))
    if verdict == "refused":
        with pytest.raises(ConfigError, match=r"largest term: logits of the loss micro-batch 9\.3 GiB"):
            fit_check.check_fit(*args, None)
        return
    with caplog.at_level("WARNING", logger="fit_check"):
        report = fit_check.check_fit(*args, None)
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "within 10 % of the card" in r.getMessage()]
    assert bool(warned) == (verdict == "warned"), report["verdict"]


def test_gpu_memory_gb_must_be_positive():
    with pytest.raises(ConfigError, match="--gpu_memory_gb must be > 0"):
        parse_args(["--model_name_or_path", "tiny", "--output_dir", "unused-out", "--gpu_memory_gb", "0"])


# ---- the literal architectures ---------------------------------------------------------------------------------------

# Parameter counts the model cards publish (Hugging Face's safetensors total), and whether the output head is tied.
PUBLISHED = {
    "Qwen2-VL-2B": (2_208_985_600, True),
    "Qwen2-VL-7B": (8_291_375_616, False),
    "Qwen2.5-VL-3B": (3_754_622_976, True),
    "Qwen2.5-VL-7B": (8_292_166_656, False),
    "Qwen2.5-VL-32B": (33_452_718_336, False),
    "Qwen3-VL-2B": (2_127_532_032, True),
    "Qwen3-VL-4B": (4_437_815_808, True),
    "Qwen3-VL-8B": (8_767_123_696, False),
}


@pytest.fixture(scope="module")
def table():
    return json.loads(TABLE.read_text())


def test_the_tables_architectures_have_the_published_parameter_counts(table):
    """fit-table.json's models are built from fit_report.ARCHITECTURES by transformers on the meta device: each has
    exactly the parameter count and head its model card publishes, so a wrong literal value shows here."""
    assert {row["model"]: (row["parameters"], row["tied_head"]) for row in table["rows"]} == PUBLISHED
    assert set(fit_report.ARCHITECTURES) == set(PUBLISHED)


def test_the_refused_line_is_the_32b_with_the_seeds_flags_on_2x80(table):
    line = table["refused"]["line"]
    assert line.startswith("error: Qwen2.5-VL-32B: ") and "\n" not in line
    assert "on 2 x 80 GB (largest term: ZeRO-3 shards of the base 31.2 GiB)" in line
    assert line in _flat(GUIDE.read_text())


# ---- the docs against the raw files ----------------------------------------------------------------------------------


def _flat(text: str) -> str:
    return " ".join(text.split())


def calibration_row(row: dict) -> str:
    """BENCHMARKS.md's row for one calibration entry, from the raw file alone."""
    raw = f"[{row['raw'].split('/')[-1]}]({row['raw']})"
    shape = f"{row['micro_batch']} × {row['sequence_tokens']:,}"
    if row["measured_allocated_gib"] is None:
        measured = f"nvidia-smi {row['nvidia_smi_gib']:.2f} GiB"
        est = f"{row['estimate_gib']:.2f} GiB with CUDA context"
        reserved = "-"
    else:
        measured = f"{row['measured_allocated_gib']:.2f} GiB"
        est = f"{row['estimate_gib']:.2f} GiB"
        reserved = f"{row['measured_reserved_gib']:.2f} GiB"
    return (f"| {raw} | {row['config']} | {row['gpu']} | {shape} | {measured} | {est} | {row['error_pct']:+.1f} % | "
            f"{reserved} |")


def fit_cell(cell: dict) -> str:
    if cell["fits"]:
        return f"fits ({cell['per_gpu_gib']:.1f} GiB{', within 10 %' if cell['tight'] else ''})"
    return f"**no** ({cell['per_gpu_gib']:.1f} GiB): {cell['make_it_fit']}"


def table_row(row: dict) -> str:
    cells = [fit_cell(row["configs"][c][card]) for c in ("seed", "tuned") for card in ("2x80GB", "2x141GB")]
    return f"| {row['model']} | {row['parameters'] / 1e9:.2f} B | " + " | ".join(cells) + " |"


def test_benchmarks_calibration_table_is_the_raw_file():
    """Every row of fit-calibration.json is in BENCHMARKS.md as the raw file gives it, with that raw file named."""
    text = BENCHMARKS.read_text()
    rows = json.loads(CALIBRATION.read_text())["rows"]
    missing = [calibration_row(r) for r in rows if calibration_row(r) not in text]
    assert not missing, "\n".join(missing)


def test_the_calibration_covers_every_measured_peak():
    """One row per measured peak of every raw bench file (each result's peak_allocated_gib, and a run that kept only
    nvidia-smi's), read here without fit_report; within 15 % of each allocated peak, or BENCHMARKS says why not."""
    measured = []
    for path in sorted((EXP / "bench-results").glob("*.json")):
        raw = json.loads(path.read_text())
        if path.name.startswith("fit-") or path.name.endswith(".figures.json"):
            continue
        for result in raw.get("results", []):
            if "peak_allocated_gib" in result:
                measured.append((f"bench-results/{path.name}", round(result["peak_allocated_gib"], 2)))
        if "results" not in raw and "nvidia_smi_peak_mib" in raw:
            measured.append((f"bench-results/{path.name}", None))
    rows = json.loads(CALIBRATION.read_text())["rows"]
    assert [(r["raw"], r["measured_allocated_gib"]) for r in rows] == measured
    assert len(measured) == 15
    for r in rows:
        if r["measured_allocated_gib"] is not None:
            assert abs(r["error_pct"]) <= 15, r
        else:  # the nvidia-smi-only run: the doc names the term that is missing
            assert "the allocator's cache" in _flat(BENCHMARKS.read_text())


def test_the_raw_files_are_what_fit_report_writes_today():
    """A change to fit_check.py's arithmetic that is not re-run into the raw files fails here."""
    assert fit_report.calibration() == json.loads(CALIBRATION.read_text())


def test_the_guides_fit_table_is_the_raw_file(table):
    text = GUIDE.read_text()
    missing = [table_row(r) for r in table["rows"] if table_row(r) not in text]
    assert not missing, "\n".join(missing)


def test_the_table_check_catches_a_changed_number(table):  # control of the two doc checks above
    row = json.loads(json.dumps(table["rows"][0]))
    row["configs"]["seed"]["2x80GB"]["per_gpu_gib"] += 0.1
    assert table_row(row) not in GUIDE.read_text()
    calib = dict(json.loads(CALIBRATION.read_text())["rows"][0], estimate_gib=1.0)
    assert calibration_row(calib) not in BENCHMARKS.read_text()


def test_fit_table_raw_file_is_what_fit_report_writes_today(table):
    fresh = fit_report.table()
    assert fresh == table
    assert math.isclose(fresh["rows"][0]["parameters"], PUBLISHED["Qwen2-VL-2B"][0])
    assert re.search(r"fit_report\.py --table", GUIDE.read_text())


def test_benchmarks_prose_quotes_the_calibration():
    """The range, the count of low estimates and the nvidia-smi-only gap BENCHMARKS.md states are the raw file's."""
    rows = json.loads(CALIBRATION.read_text())["rows"]
    allocated = [r for r in rows if r["measured_allocated_gib"] is not None]
    errors = [r["error_pct"] for r in allocated]
    text = _flat(BENCHMARKS.read_text())
    assert f"−{abs(min(errors)):.1f} % to +{max(errors):.1f} %" in text
    assert f"−{abs(min(errors)):.1f} % to +{max(errors):.1f} % of every peak measured on the 3B" in _flat(GUIDE.read_text())
    assert f"low in {sum(e < 0 for e in errors)} of the {len(errors)}" in text
    smi = next(r for r in rows if r["measured_allocated_gib"] is None)
    assert f"estimate plus the CUDA context is {abs(smi['error_pct']):.1f} % under" in text
    gaps = [r["measured_reserved_gib"] - r["measured_allocated_gib"] for r in allocated]
    assert f"Reserved minus allocated was {min(gaps):.1f}-{max(gaps):.1f} GiB" in text


def test_facts_are_counted_while_zero3_is_registered():
    """Under `accelerate launch` the trainer's ZeRO-3 config is registered with transformers before the dry run's
    check: the count must still build the model on the meta device, not inside deepspeed.zero.Init (which failed
    `make dry-run` with an IndexError in _init_weights before fit_check._without_zero3_init)."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        facts = fit_check.model_facts(fit_report.config_of("Qwen2.5-VL-3B"), lora_target_modules=["q_proj", "v_proj"])
        assert facts.parameters == PUBLISHED["Qwen2.5-VL-3B"][0]
        assert is_deepspeed_zero3_enabled()  # put back for the trainer
    finally:
        unset_hf_deepspeed_config()
    del registered
