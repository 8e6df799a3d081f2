"""FLOPs and utilisation: the numerators and denominators of scripts/bench.py's MFU and HFU.

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
"""

from __future__ import annotations

import json
from pathlib import Path

# Dense bf16 tensor-core peak per card, TFLOP/s: NVIDIA's datasheets print the 2:4-sparsity figure, twice the dense
# one (H100 SXM and H200 SXM: 1,979; H100 PCIe: 1,513; H100 NVL and H200 NVL: 1,671). The denominator of MFU and HFU;
# the first name contained in torch.cuda.get_device_name() wins, so the PCIe/NVL parts come before the SXM ones.
DATASHEET_BF16_DENSE_TFLOPS = [("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100", 989.4),
                               ("H200", 989.4)]


def datasheet_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in DATASHEET_BF16_DENSE_TFLOPS if key in device_name), None)


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
