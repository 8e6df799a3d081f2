"""The Qwen vision towers' chunked attention as one SDPA call per chunk length, instead of one per chunk.

Without FlashAttention-2 (not in the FlexAI runtime, nor in this project's pins), transformers 4.57 runs a Qwen vision
tower's attention as one SDPA call per chunk of `cu_seqlens` ("Process each chunk separately"): per window in
Qwen2.5-VL's windowed blocks, per image in its full-attention blocks and in every block of Qwen2-VL and Qwen3-VL. A
448-px image has 16 windows of 64 patches, so a Qwen2.5-VL training micro-batch of 16 images makes 256 SDPA calls in
each of the 28 windowed blocks, each a few microseconds of GPU work behind tens of microseconds of Python and launch
overhead, plus one `.tolist()` sync per block. transformers#37363 weighed a padded variant on single images and kept
the loop; with GRPO's many images per micro-batch it cost about 30 % of the training forward pass (3.93 -> 2.75 s per
step with 16 images per micro-batch on H200, experiments/vlm-grpo/BENCHMARKS.md). Qwen2-VL and Qwen3-VL make one call
per image: 16 a block for that micro-batch, one when the images share a size.

Here chunks of equal length are stacked along the batch dimension, so a block makes one SDPA call per distinct chunk
length (one call when every image has the same size). Every query still attends to exactly the keys of its own
chunk, so the result equals the upstream loop up to floating-point summation order (tests/test_vision_attention.py,
each family's tower). The three families' attention modules share one forward (fused qkv, the tower's rotary
embedding, SDPA per chunk, proj); each class is patched with its own module's rotary function. Only the `sdpa`
implementation is replaced; `eager` and `flash_attention_2` keep the upstream code.
"""

from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F

# config.model_type -> (module, class) of the family's vision attention (families.FAMILIES names the families)
ATTENTION_CLASSES = {
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention"),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"),
    "qwen3_vl": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention"),
}
_UPSTREAM: dict[type, object] = {}  # attention class -> its upstream forward


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
    """The vision attention's forward with the per-chunk loop replaced by `window_attention` (any of the three
    families' classes: the rotary function is the one of the class's own module)."""
    upstream = _UPSTREAM[type(self)]
    if self.config._attn_implementation != "sdpa" or position_embeddings is None:
        return upstream(self, hidden_states, cu_seqlens, rotary_pos_emb, position_embeddings, **kwargs)
    apply_rotary_pos_emb_vision = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = window_attention(q, k, v, cu_seqlens, self.scaling)
    return self.proj(out.reshape(seq_length, -1).contiguous())


def attention_class(model_type: str) -> type:
    module, name = ATTENTION_CLASSES[model_type]
    return getattr(importlib.import_module(module), name)


def enable_batched_vision_attention(enabled: bool = True) -> None:
    """Switch every vision attention layer of the three families (class-wide, idempotent) to the batched form, or
    back to upstream's."""
    for model_type in ATTENTION_CLASSES:
        cls = attention_class(model_type)
        _UPSTREAM.setdefault(cls, cls.forward)
        cls.forward = _forward if enabled else _UPSTREAM[cls]
