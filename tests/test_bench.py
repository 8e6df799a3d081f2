"""scripts/bench.py on CPU: its FLOP count against torch's own counter, the GPU split of --parallel, and one real
(tiny) benchmark run end to end. The GPU numbers themselves are in experiments/vlm-grpo/BENCHMARKS.md."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import bench


def test_forward_flops_match_torch_flop_counter(tiny_model, processor):
    """bench.train_flops' forward count (the MFU numerator) against torch.utils.flop_counter on the real model:
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

    arch = bench.load_arch(tiny_model)
    patches = [int(g.prod()) for g in batch["image_grid_thw"]]
    formula = bench.train_flops(arch, B, T, completion_len, patches, lora_r=0, checkpointing=False)
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
    """bench.train_flops' backward and recompute terms against torch.utils.flop_counter on a real backward pass of the
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

    arch = bench.load_arch(tiny_model)
    patches = [int(g.prod()) for g in batch["image_grid_thw"]]
    formula = bench.train_flops(arch, B, T, completion_len, patches, lora_r=lora_r, checkpointing=True)
    causal_half = 2 * B * T * T * arch["d"] * arch["L"]
    assert fwd_counted_ckpt == fwd_counted
    assert formula["fwd"] + causal_half == pytest.approx(fwd_counted, rel=1e-3)
    assert formula["bwd"] + 2 * causal_half == pytest.approx(bwd_counted, rel=1e-9)
    assert formula["recompute"] + causal_half == pytest.approx(bwd_counted_ckpt - bwd_counted, rel=1e-9)
    assert formula["recompute"] > 0
    no_ckpt = bench.train_flops(arch, B, T, completion_len, patches, lora_r=lora_r, checkpointing=False)
    assert no_ckpt["recompute"] == 0 and no_ckpt["bwd"] == formula["bwd"]


def test_parallel_gpu_split():
    assert bench.gpu_slices(2, 2, 4, parallel=True) == [[0, 1], [2, 3]]
    assert bench.gpu_slices(2, 2, 2, parallel=False) == [[0, 1], [0, 1]]
    with pytest.raises(SystemExit, match="needs 2 configurations x 2 GPUs = 4 GPUs, this machine has 2"):
        bench.gpu_slices(2, 2, 2, parallel=True)


@pytest.mark.slow
def test_bench_runs_end_to_end_on_cpu(repo_root, tmp_path):
    """One configuration, tiny model, 2 ZeRO-3 CPU processes: a record per rank and step, the phases, FLOPs and a
    table come out."""
    out = tmp_path / "bench"
    proc = subprocess.run(
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
