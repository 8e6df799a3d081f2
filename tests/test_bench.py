"""scripts/bench.py (its parts in scripts/benchkit/) on CPU: the FLOP count against torch's own counter, the GPU split
of --parallel, `--refigure` against the committed figures, and one real (tiny) benchmark run end to end. The GPU numbers themselves are in experiments/vlm-grpo/BENCHMARKS.md."""

import json
import os
import shutil
import sys

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)
import torch
from PIL import Image

from benchkit import REPO, flops, report, runner


def test_forward_flops_match_torch_flop_counter(tiny_model, processor):
    """flops.train_flops' forward count (the MFU numerator) against torch.utils.flop_counter on the real model:
    the decoder, the LM head over completion positions only, and the vision tower with its window attention.
    Eager attention, because the counter sees its matmuls (it has no formula for CPU SDPA kernels). It counts the
    decoder's full T x T score matrix, masked or not; the formula only the causal half, so the totals must differ by
    exactly that half (plus the rotary embeddings' tiny matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    completion_len = 40
    batch = _two_image_batch(processor, completion_len)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    B, T = input_ids.shape

    with torch.no_grad(), FlopCounterMode(display=False) as vision_counter:
        model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=batch["pixel_values"],
              image_grid_thw=batch["image_grid_thw"], logits_to_keep=completion_len + 1)
    counted = counter.get_total_flops()

    arch = flops.load_arch(tiny_model)
    patches = [int(g.prod()) for g in batch["image_grid_thw"]]
    formula = flops.train_flops(arch, B, T, completion_len, patches, lora_r=0, checkpointing=False)
    causal_half = 2 * B * T * T * arch["d"] * arch["L"]
    assert formula["vision"] == pytest.approx(vision_counter.get_total_flops(), rel=1e-6)
    assert formula["fwd"] + causal_half == pytest.approx(counted, rel=1e-3)
    assert formula["recompute"] == 0 and formula["vision"] > 0


def _two_image_batch(processor, completion_len: int):
    """Two prompts with a 448 px image each, followed by a completion of digit tokens (no image tokens)."""
    from data import make_prompt

    images = [Image.new("RGB", (448, 448), "red"), Image.new("RGB", (448, 448), "blue")]
    messages = make_prompt("How many?")
    messages[1] = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text, text], images=images, return_tensors="pt", padding=True)
    digits = processor.tokenizer("0 1 2 3 4 5 6 7 8 9", add_special_tokens=False)["input_ids"]
    completion = torch.tensor([(digits * completion_len)[:completion_len]] * 2)
    batch["input_ids"] = torch.cat([batch["input_ids"], completion], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(completion)], dim=1)
    return batch


def test_backward_and_recompute_flops_match_torch_flop_counter(tiny_model, processor):
    """flops.train_flops' backward and recompute terms against torch.utils.flop_counter on a real backward pass of the
    training setup: frozen tiny model with LoRA on q_proj/v_proj, input embeddings' output requiring grad (what TRL
    does for PEFT + checkpointing), loss over the completion positions' logits, with and without non-reentrant
    gradient checkpointing. The counter sees the full T x T attention matrices; the formula counts the causal half,
    so the counter's forward exceeds it by `causal_half` (plus the rotary embeddings' tiny matmuls), its backward
    (2 matmuls per attention matmul) by 2 x `causal_half`, and the recomputation (the decoder layers again) by
    `causal_half`."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2_5_VLForConditionalGeneration

    lora_r, completion_len = 8, 40
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32,
                                                               attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    model.enable_input_require_grads()
    model.train()
    batch = _two_image_batch(processor, completion_len)
    B, T = batch["input_ids"].shape

    def count(checkpointing: bool) -> tuple[int, int]:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        with FlopCounterMode(display=False) as forward:
            logits = model(**batch, logits_to_keep=completion_len + 1).logits
        with FlopCounterMode(display=False) as backward:
            logits.sum().backward()
        model.zero_grad(set_to_none=True)
        return forward.get_total_flops(), backward.get_total_flops()

    fwd_counted, bwd_counted = count(checkpointing=False)
    fwd_counted_ckpt, bwd_counted_ckpt = count(checkpointing=True)

    arch = flops.load_arch(tiny_model)
    patches = [int(g.prod()) for g in batch["image_grid_thw"]]
    formula = flops.train_flops(arch, B, T, completion_len, patches, lora_r=lora_r, checkpointing=True)
    causal_half = 2 * B * T * T * arch["d"] * arch["L"]
    assert fwd_counted_ckpt == fwd_counted
    assert formula["fwd"] + causal_half == pytest.approx(fwd_counted, rel=1e-3)
    assert formula["bwd"] + 2 * causal_half == pytest.approx(bwd_counted, rel=1e-9)
    assert formula["recompute"] + causal_half == pytest.approx(bwd_counted_ckpt - bwd_counted, rel=1e-9)
    assert formula["recompute"] > 0
    no_ckpt = flops.train_flops(arch, B, T, completion_len, patches, lora_r=lora_r, checkpointing=False)
    assert no_ckpt["recompute"] == 0 and no_ckpt["bwd"] == formula["bwd"]


def test_parallel_gpu_split():
    assert runner.gpu_slices(2, 2, 4, parallel=True) == [[0, 1], [2, 3]]
    assert runner.gpu_slices(2, 2, 2, parallel=False) == [[0, 1], [0, 1]]
    with pytest.raises(SystemExit, match="needs 2 configurations x 2 GPUs = 4 GPUs, this machine has 2"):
        runner.gpu_slices(2, 2, 2, parallel=True)


@pytest.mark.slow
def test_bench_runs_end_to_end_on_cpu(repo_root, tmp_path):
    """One configuration, tiny model, 2 ZeRO-3 CPU processes: a record per rank and step, the phases, FLOPs and a
    table come out."""
    out = tmp_path / "bench"
    proc = _proc.run(
        [sys.executable, "scripts/bench.py", "--out", str(out), "--preset", "tiny", "--configs", "seed", "--warmup", "1",
         "--steps", "1", "--completion_length", "8", "--rows", "32", "--image_side", "112", "--timeout_s", "600"],
        cwd=repo_root, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    (seed,) = report["results"]
    assert seed["status"] == "ok" and seed["measured_steps"] == 1
    assert seed["completions_per_step"] == 16  # 2 prompts x 8 generations, both ranks
    per_rank = seed["per_rank"]
    assert len(per_rank) == 2 and all(r["generated_tokens"] == 8 * 8 for r in per_rank), "completions fixed at 8 tokens"
    for phase in ("generation", "reward", "forward", "vision_in_forward", "backward", "optimizer"):
        assert seed["phases_per_step"][phase] > 0, phase
    assert per_rank[0]["flops_per_step"]["recompute"] > 0  # the seed checkpoints
    assert "| seed | ok | 1 |" in (out / "bench.md").read_text()
    if report["generation"] == "vLLM colocate":  # where vLLM is built (make vllm-cpu): its generation and the sync
        for phase in ("vllm_generate", "weight_sync", "logps_nograd" if "-trl" in seed["name"] else "rollout"):
            assert seed["phases_per_step"][phase] > 0, phase
        assert 0 < seed["trainer_side_s"] < seed["step_s"]


# ---- issue 11: names and units, the vLLM path's trainer side ------------------------------------------------------

RESULTS = REPO / "experiments" / "vlm-grpo" / "bench-results"


def test_datasheet_peaks_are_the_dense_bf16_figures():
    """NVIDIA's datasheets print bf16 tensor-core peaks with 2:4 sparsity (H100/H200 SXM 1,979, H100 PCIe 1,513,
    NVL 1,671 TFLOP/s); MFU's denominator is the dense half. PCIe/NVL names must not fall through to the SXM figure."""
    assert flops.datasheet_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(1979 / 2, abs=0.5)
    assert flops.datasheet_tflops("NVIDIA H200") == pytest.approx(1979 / 2, abs=0.5)
    assert flops.datasheet_tflops("NVIDIA H100 PCIe") == pytest.approx(1513 / 2, abs=0.5)
    assert flops.datasheet_tflops("NVIDIA H200 NVL") == pytest.approx(1671 / 2, abs=0.5)
    assert flops.datasheet_tflops("NVIDIA A100-SXM4-80GB") is None


def test_utilisation_figures_on_a_worked_example():
    """1e15 model FLOPs + 0.5e15 recomputation in 2 s of forward + backward, a 10 s step with 0.25e15 FLOPs of
    no-grad forwards, 20,000 real tokens, 1,000 TFLOP/s datasheet, 800 measured."""
    f = flops.utilisation({"fwd": 0.4e15, "bwd": 0.6e15, "recompute": 0.5e15, "nograd": 0.25e15}, train_s=2.0,
                          step_s=10.0, tokens_real=20_000, datasheet=1000.0, matmul=800.0)
    assert f == pytest.approx({"train_tflops": 750.0, "train_mfu": 0.5, "train_hfu": 0.75, "train_hfu_vs_matmul": 0.9375,
                               "step_mfu": 0.1, "step_hfu": 0.175, "e2e_tok_s": 2000.0})


@pytest.mark.parametrize("call", ["1-upstream-vision-loop", "2-batched-vision", "3-batched-vision-zero3-knobs"])
def test_refigured_files_are_what_refigure_derives_from_the_raw_files(call):
    """The *.figures.json beside each raw file of calls 1-3 are refigure()'s output (regenerate with
    `scripts/bench.py --refigure FILE`), and one figure is recomputed here by hand from the raw numbers: the tuned
    training-phase MFU = (fwd + bwd FLOPs) / (forward + backward s) / 989.4 TFLOP/s, rank mean."""
    raw = json.loads((RESULTS / f"{call}.json").read_text())
    derived = json.loads((RESULTS / f"{call}.figures.json").read_text())
    assert derived == json.loads(json.dumps(report.refigure(raw, f"experiments/vlm-grpo/bench-results/{call}.json")))
    tuned = next(r for r in raw["results"] if r["name"] == "tuned")
    by_hand = sum((r["flops_per_step"]["fwd"] + r["flops_per_step"]["bwd"])
                  / (r["phases_per_step"]["forward"] + r["phases_per_step"]["backward"]) / 989.4e12
                  for r in tuned["per_rank"]) / len(tuned["per_rank"])
    assert next(r for r in derived["results"] if r["name"] == "tuned")["train_mfu"] == pytest.approx(by_hand)
    # the old recompute-counted "MFU" of the raw file was above this page's HFU vs matmul (down_proj was counted)
    assert tuned["mfu"] > next(r for r in derived["results"] if r["name"] == "tuned")["train_hfu_vs_matmul"]


REFIGURED = ["1-upstream-vision-loop", "2-batched-vision", "3-batched-vision-zero3-knobs"]


def test_refigure_command_rewrites_every_committed_figures_file_byte_for_byte(tmp_path):
    """`scripts/bench.py --refigure RAW` (the command BENCHMARKS.md gives) writes RAW's *.figures.json beside it, and
    records RAW's path relative to the repository. So it runs on a copy of scripts/ and of each raw file in the same
    layout under tmp_path (the committed files are never written), and its output must equal the committed file
    byte for byte: a change to the FLOP model, the utilisation formulas or the writer shows up here."""
    assert sorted(p.name for p in RESULTS.glob("*.figures.json")) == [f"{call}.figures.json" for call in REFIGURED]
    shutil.copytree(REPO / "scripts", tmp_path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    results = tmp_path / "experiments" / "vlm-grpo" / "bench-results"
    results.mkdir(parents=True)
    for call in REFIGURED:
        shutil.copy(RESULTS / f"{call}.json", results)
        proc = _proc.run([sys.executable, str(tmp_path / "scripts" / "bench.py"), "--refigure",
                          str(results / f"{call}.json")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (results / f"{call}.figures.json").read_bytes() == (RESULTS / f"{call}.figures.json").read_bytes(), call


@pytest.mark.slow
def test_vllm_stand_in_measures_the_trainer_side_before_and_after_the_cuts(repo_root, tmp_path, tiny_model):
    """`--vllm_stand_in` (for GPU hosts without vLLM): TRL's vLLM colocate path with the engine replaced, on
    the tiny model, TRL's paths (`seed-trl`) and fast_paths.py's (`seed`) in one run: the importance-sampling
    forward is there before and gone after, every step syncs weights, and after training the two syncs hand over
    identical tensors, the layer-by-layer one with fewer ZeRO-3 parameters held at once. The suite's tiny model
    (`--model`; the same preset) spares a second build of it: the test above has bench.py build its own."""
    out, checkpoint_dir = tmp_path / "bench", tmp_path / "output-checkpoint"
    proc = _proc.run(
        [sys.executable, "scripts/bench.py", "--out", str(out), "--model", str(tiny_model), "--configs",
         "seed-trl,seed", "--vllm_stand_in", "--warmup", "1", "--steps", "1", "--completion_length", "8", "--rows", "32",
         "--image_side", "112", "--timeout_s", "600"],
        cwd=repo_root, capture_output=True, text=True, timeout=900,
        env={**os.environ, "FLEXAI_OUTPUT_CHECKPOINT_DIR": str(checkpoint_dir)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    # in a FlexAI job the results (not the model or data) land where `make flexai-fetch` finds them
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["bench.json", "bench.md"]
    assert json.loads((checkpoint_dir / "bench.json").read_text()) == report
    assert report["generation"].startswith("vLLM stand-in")
    trl, fast = report["results"]
    assert trl["status"] == fast["status"] == "ok"
    assert trl["phases_per_step"]["logps_nograd"] > 0 and "logps_nograd" not in fast["phases_per_step"]
    assert trl["per_rank"][0]["flops_per_step"]["nograd"] > 0 and "nograd" not in fast["per_rank"][0]["flops_per_step"]
    for r in (trl, fast):
        assert r["phases_per_step"]["weight_sync"] > 0 and r["completions_per_step"] == 16
        assert r["trainer_side_s"] <= r["step_s"]
    assert trl["sync_compare"] is None
    for sync in fast["sync_compare"].values():
        assert sync["identical_tensors"] and sync["layerwise"]["tensors"] == sync["trl"]["tensors"] > 20
        assert 0 < sync["layerwise"]["gathered_at_handoff_gib"] < sync["trl"]["gathered_at_handoff_gib"]
