"""Qwen2.5-VL's vision window attention as one SDPA call per window size, instead of one per window.

Without FlashAttention-2 (not in the FlexAI runtime, nor in this project's pins), transformers 4.57 runs the vision
tower's attention as one SDPA call per window (`Qwen2_5_VLVisionAttention.forward`, "Process each chunk
separately"). A 448-px image has 16 windows of 64 patches, so a training micro-batch of 16 images makes 256 SDPA
calls in each of the 28 windowed blocks, each a few microseconds of GPU work behind tens of microseconds of Python
and launch overhead, plus one `.tolist()` sync per block. transformers#37363 weighed a padded variant on single
images and kept the loop; with GRPO's many images per micro-batch it cost about 30 % of the training forward pass
(3.93 -> 2.75 s per step with 16 images per micro-batch on H200, experiments/vlm-grpo/BENCHMARKS.md).

Here windows of equal length are stacked along the batch dimension, so a block makes one SDPA call per distinct window
length (one call when every image has the same size). Every query still attends to exactly the keys of its own
window, so the result equals the upstream loop up to floating-point summation order (tests/test_vision_attention.py).
Only the `sdpa` implementation is replaced; `eager` and `flash_attention_2` keep the upstream code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_UPSTREAM_FORWARD = None


def window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Non-causal attention within each window [cu_seqlens[i], cu_seqlens[i+1]) of the sequence.

    query/key/value: (1, heads, S, head_dim). Returns (1, S, heads, head_dim), the layout of upstream's
    `torch.cat(attn_outputs, dim=1)`."""
    _, heads, seq, dim = query.shape
    bounds = cu_seqlens.tolist()  # one host sync per block, as upstream's `lengths.tolist()`
    if bounds[0] != 0 or bounds[-1] != seq:
        raise ValueError(f"cu_seqlens must span the sequence [0, {seq}], got [{bounds[0]}, {bounds[-1]}]")
    groups: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            groups.setdefault(end - start, []).append(start)

    if len(groups) == 1:
        (n, starts), = groups.items()
        if n * len(starts) == seq:  # equal windows tile the sequence: a reshape, no copy of indices
            q, k, v = (t[0].reshape(heads, len(starts), n, dim).transpose(0, 1) for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (windows, heads, n, dim)
            return out.permute(0, 2, 1, 3).reshape(1, seq, heads, dim)

    out = query.new_empty(seq, heads, dim)
    for n, starts in groups.items():
        index = (torch.tensor(starts, device=query.device)[:, None] + torch.arange(n, device=query.device)).reshape(-1)
        q, k, v = (t[0][:, index].reshape(heads, len(starts), n, dim).transpose(0, 1) for t in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (windows, heads, n, dim)
        out[index] = o.permute(0, 2, 1, 3).reshape(-1, heads, dim)
    return out.unsqueeze(0)


def _forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
    """Qwen2_5_VLVisionAttention.forward with the per-window loop replaced by `window_attention`."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    if self.config._attn_implementation != "sdpa" or position_embeddings is None:
        return _UPSTREAM_FORWARD(self, hidden_states, cu_seqlens, rotary_pos_emb, position_embeddings, **kwargs)
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = window_attention(q, k, v, cu_seqlens, self.scaling)
    return self.proj(out.reshape(seq_length, -1).contiguous())


def enable_batched_vision_attention(enabled: bool = True) -> None:
    """Switch every Qwen2.5-VL vision attention layer (class-wide, idempotent) to the batched form, or back."""
    global _UPSTREAM_FORWARD
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    if _UPSTREAM_FORWARD is None:
        _UPSTREAM_FORWARD = Qwen2_5_VLVisionAttention.forward
    Qwen2_5_VLVisionAttention.forward = _forward if enabled else _UPSTREAM_FORWARD
