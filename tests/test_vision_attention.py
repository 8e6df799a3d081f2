"""The batched vision attention (code/vlm-grpo/vision_attention.py) against transformers' per-chunk loop: windows and
images of Qwen2.5-VL's tower, images of Qwen2-VL's and Qwen3-VL's."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vision_attention import enable_batched_vision_attention, window_attention


def per_window_reference(q, k, v, cu_seqlens, scale):
    """The definition: each window attends to itself only. (1, H, S, D) -> (1, S, H, D)."""
    outs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        sl = slice(start, end)
        outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], scale=scale))
    return torch.cat(outs, dim=2).transpose(1, 2)


@pytest.mark.parametrize(
    "bounds",
    [
        [0, 64, 128, 192, 256],  # equal windows tiling the sequence (the reshape path)
        [0, 64, 128, 144, 160, 224, 230],  # mixed lengths, equal ones not adjacent
        [0, 30, 30, 90, 100],  # an empty window
        [0, 77],  # one window: full attention over one image
    ],
)
def test_window_attention_matches_per_window_loop(bounds):
    torch.manual_seed(0)
    seq, heads, dim = bounds[-1], 4, 16
    q, k, v = (torch.randn(1, heads, seq, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = torch.tensor(bounds, dtype=torch.int32)
    got = window_attention(q, k, v, cu, dim**-0.5)
    want = per_window_reference(q, k, v, cu, dim**-0.5)
    assert got.shape == (1, seq, heads, dim)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_window_attention_does_not_leak_across_windows():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 8) for _ in range(3))
    cu = torch.tensor([0, 64, 128])
    base = window_attention(q, k, v, cu, 8**-0.5)
    v2 = v.clone()
    v2[:, :, 64:] += 10.0  # change only the second window's values
    moved = window_attention(q, k, v2, cu, 8**-0.5)
    torch.testing.assert_close(moved[:, :64], base[:, :64])
    assert not torch.allclose(moved[:, 64:], base[:, 64:])


def test_window_attention_rejects_bounds_that_miss_the_sequence():
    q = torch.zeros(1, 2, 10, 4)
    with pytest.raises(ValueError, match="span the sequence"):
        window_attention(q, q, q, torch.tensor([0, 8]), 0.5)


MIXED_SIZES = [(448, 448), (300, 200), (150, 420)]  # windows of different lengths: the gather path
SAME_SIZES = [(448, 448)] * 3  # equal windows tiling the sequence: the reshape path


@pytest.mark.parametrize("attn_implementation,sizes", [("sdpa", MIXED_SIZES), ("sdpa", SAME_SIZES), ("eager", MIXED_SIZES)])
def test_vision_tower_output_and_gradient_unchanged(tiny_model, processor, attn_implementation, sizes):
    """The real tower (tiny config: one windowed and one full-attention block), upstream loop vs batched: same
    features, same input gradients."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    images = [Image.new("RGB", size, color) for size, color in zip(sizes, ["red", "blue", "green"])]
    inputs = processor.image_processor(images=images, return_tensors="pt")
    grid = inputs["image_grid_thw"]

    def features(batched: bool):
        enable_batched_vision_attention(batched)
        pixels = inputs["pixel_values"].clone().requires_grad_(True)
        out = model.visual(pixels, grid_thw=grid)
        (grad,) = torch.autograd.grad(out.square().sum(), pixels)
        return out.detach(), grad

    try:
        upstream, upstream_grad = features(False)
        batched, batched_grad = features(True)
    finally:
        enable_batched_vision_attention(True)
    assert upstream.shape[0] == int(grid.prod(dim=1).sum()) // 4
    torch.testing.assert_close(batched, upstream, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched_grad, upstream_grad, rtol=1e-4, atol=1e-5)


def test_training_script_switch(tiny_model):
    """--no_batched_vision_attention restores the upstream forward; the default installs the batched one."""
    import grpo_vlm
    import vision_attention
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    argv = ["--model_name_or_path", str(tiny_model), "--dataset_name", "synthetic", "--output_dir", "/tmp/unused"]
    script_args, _, _ = grpo_vlm.parse_args([*argv, "--no_batched_vision_attention"])
    assert script_args.batched_vision_attention is False
    try:
        vision_attention.enable_batched_vision_attention(script_args.batched_vision_attention)
        assert Qwen2_5_VLVisionAttention.forward is vision_attention._UPSTREAM[Qwen2_5_VLVisionAttention]
        script_args, _, _ = grpo_vlm.parse_args(argv)
        vision_attention.enable_batched_vision_attention(script_args.batched_vision_attention)
        assert Qwen2_5_VLVisionAttention.forward is vision_attention._forward
    finally:
        vision_attention.enable_batched_vision_attention(True)


@pytest.mark.parametrize("sizes", [MIXED_SIZES, SAME_SIZES], ids=["mixed", "same"])
@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_other_families_towers_output_and_gradient_unchanged(family_model, family, sizes):
    """Qwen2-VL's and Qwen3-VL's towers (one attention chunk per image) with SDPA: upstream loop vs batched, the
    features and Qwen3-VL's deepstack features alike."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vision_attention

    folder = family_model(family)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    image_processor = AutoProcessor.from_pretrained(folder).image_processor
    images = [Image.new("RGB", size, color) for size, color in zip(sizes, ["red", "blue", "green"])]
    inputs = image_processor(images=images, return_tensors="pt")
    grid = inputs["image_grid_thw"]
    calls = []

    def features(batched: bool):
        enable_batched_vision_attention(batched)
        pixels = inputs["pixel_values"].clone().requires_grad_(True)
        out = model.model.visual(pixels, grid_thw=grid)
        if isinstance(out, tuple):  # Qwen3-VL: (features, deepstack features of some blocks)
            out = torch.cat([out[0], *out[1]])
        (grad,) = torch.autograd.grad(out.square().sum(), pixels)
        return out.detach(), grad

    upstream_window_attention = vision_attention.window_attention
    vision_attention.window_attention = lambda *a: calls.append(a[3]) or upstream_window_attention(*a)
    try:
        upstream, upstream_grad = features(False)
        assert calls == []
        batched, batched_grad = features(True)
    finally:
        vision_attention.window_attention = upstream_window_attention
        enable_batched_vision_attention(True)
    assert len(calls) == 2  # the tiny towers' 2 blocks went through the batched form: the comparison is not empty
    assert calls[0].tolist()[-1] == int(grid.prod(dim=1).sum())  # one chunk a whole image, all images in the call
    torch.testing.assert_close(batched, upstream, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched_grad, upstream_grad, rtol=1e-4, atol=1e-5)
