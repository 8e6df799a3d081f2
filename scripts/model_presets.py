"""The architectures of the real checkpoints, as make_tiny_model.py builds them: per family, `tiny` (the smallest
values the real code paths accept, for CPU tests) and the size presets, each the public config.json values of the
matching `-Instruct` checkpoint with the vocabulary padded to its full size. scripts/fit_report.py sizes the real models
from these same values; make_tiny_model.py turns one into a model folder."""

from __future__ import annotations

PRESETS = {
    # Each shrunken knob is the smallest value the real code paths accept.
    "tiny": dict(
        text=dict(
            hidden_size=128,  # head_dim 64: a size vLLM's and FlashAttention's kernels accept
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,  # GQA as in the real model (2 query heads per KV head)
            max_position_embeddings=4096,
            rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},  # sums to head_dim / 2
            tie_word_embeddings=True,
        ),
        vision=dict(
            depth=2,
            hidden_size=128,  # vision head_dim 64
            intermediate_size=256,
            num_heads=2,
            out_hidden_size=128,  # = text hidden_size (the merger projects into it)
            fullatt_block_indexes=[1],  # one windowed and one full-attention block, as the real tower mixes both
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        bpe_vocab=600,
        pad_vocab_to=None,
    ),
    # Public values of Qwen/Qwen2.5-VL-3B-Instruct's config.json.
    "3b": dict(
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
            tie_word_embeddings=True,
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            fullatt_block_indexes=[7, 15, 23, 31],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        bpe_vocab=2000,
        pad_vocab_to=151643,  # Qwen2's regular vocabulary; its special tokens follow (151,657 tokens in all)
        vocab_size=151936,  # the checkpoint's embedding rows: the tokenizer's 151,657 padded up, as in config.json
    ),
}
# The tiny model with its own output head: learning_demo.py --vllm adapts lm_head, which vLLM can only serve for a
# model that does not tie it to the input embeddings (vllm_colocate.check_vllm_lora_targets says why).
PRESETS["tiny-untied"] = {
    **PRESETS["tiny"], "text": {**PRESETS["tiny"]["text"], "tie_word_embeddings": False}
}

# Public values of Qwen/Qwen2.5-VL-7B-Instruct's and -32B-Instruct's config.json: same vision tower as the 3B, an
# untied output head and 152,064 embedding rows.
PRESETS["7b"] = {
    **PRESETS["3b"],
    "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=128000, rope_theta=1000000.0,
                 rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=False),
    "vision": {**PRESETS["3b"]["vision"], "out_hidden_size": 3584},
    "vocab_size": 152064,
}
PRESETS["32b"] = {
    **PRESETS["3b"],
    "text": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                 num_key_value_heads=8, max_position_embeddings=128000, rope_theta=1000000.0,
                 rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=False),
    # the 32B's vision MLP is wider than the 3B's and 7B's (3456, not 3420): 33,452,718,336 parameters as published
    "vision": {**PRESETS["3b"]["vision"], "out_hidden_size": 5120, "intermediate_size": 3456},
    "vocab_size": 152064,
}

# Qwen2-VL: the text model of Qwen2.5-VL; a vision tower without windows, sized by embed_dim and mlp_ratio, whose
# merger projects into `hidden_size` (= the text hidden size). Same 14-px patches and 2x2 merge: one token per 28x28.
QWEN2_VL_PRESETS = {
    "tiny": dict(
        text={**PRESETS["tiny"]["text"]},
        vision=dict(depth=2, embed_dim=128, mlp_ratio=2, num_heads=2, hidden_size=128,  # hidden_size = text's
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        bpe_vocab=600,
        pad_vocab_to=None,
    ),
}


def _qwen2_vl_preset(hidden, intermediate, heads, kv_heads, tied, vocab_size):
    """Public values of Qwen/Qwen2-VL-{2B,7B}-Instruct's config.json (both: 28 layers, a 32-block vision tower of width
    1280 merging into the text width, 32k context)."""
    return dict(
        text=dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=28, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=32768, rope_theta=1000000.0,
                  rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=tied),
        vision=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=hidden, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
        bpe_vocab=2000,
        pad_vocab_to=151643,
        vocab_size=vocab_size,
    )


QWEN2_VL_PRESETS["2b"] = _qwen2_vl_preset(1536, 8960, 12, 2, True, 151936)
QWEN2_VL_PRESETS["7b"] = _qwen2_vl_preset(3584, 18944, 28, 4, False, 152064)

# Qwen3-VL (dense): 16-px patches and a 2x2 merge, so one token per 32x32 pixels; an explicit head_dim; interleaved
# M-RoPE; learned vision position embeddings (a square grid, interpolated to the image); "deepstack" features of some
# vision blocks added to the first text layers.
QWEN3_VL_PRESETS = {
    "tiny": dict(
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,  # a size vLLM's and FlashAttention's kernels accept
            max_position_embeddings=4096,
            rope_theta=5000000.0,
            # the real [24, 20, 20] scaled to sum to head_dim / 2
            rope_scaling={"rope_type": "default", "mrope_section": [12, 10, 10], "mrope_interleaved": True},
            tie_word_embeddings=True,
        ),
        vision=dict(
            depth=2,
            hidden_size=128,  # vision head_dim 64
            intermediate_size=256,
            num_heads=2,
            out_hidden_size=128,  # = text hidden_size
            num_position_embeddings=256,  # a 16x16 grid (the real 2304 is 48x48)
            deepstack_visual_indexes=[0],  # one deepstack level, into the first text layer
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        bpe_vocab=600,
        pad_vocab_to=None,
    ),
}


def _qwen3_vl_preset(hidden, intermediate, layers, heads, tied, vision):
    """Public values of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct's config.json (all: 8 KV heads, head_dim 128, 151,936
    embedding rows, 256k context)."""
    return dict(
        text=dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rope_theta=5000000.0,
                  rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                  tie_word_embeddings=tied),
        vision=dict(**vision, num_heads=16, out_hidden_size=hidden, num_position_embeddings=2304, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2),
        bpe_vocab=2000,
        pad_vocab_to=151643,
        vocab_size=151936,
    )


_QWEN3_VL_SMALL_TOWER = dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17])
QWEN3_VL_PRESETS["2b"] = _qwen3_vl_preset(2048, 6144, 28, 16, True, _QWEN3_VL_SMALL_TOWER)
QWEN3_VL_PRESETS["4b"] = _qwen3_vl_preset(2560, 9728, 36, 32, True, _QWEN3_VL_SMALL_TOWER)
QWEN3_VL_PRESETS["8b"] = _qwen3_vl_preset(
    4096, 12288, 36, 32, False,
    dict(depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=[8, 16, 24]),
)
for _presets in (QWEN2_VL_PRESETS, QWEN3_VL_PRESETS):
    _presets["tiny-untied"] = {**_presets["tiny"], "text": {**_presets["tiny"]["text"], "tie_word_embeddings": False}}

DEFAULT_FAMILY = "qwen2.5-vl"
FAMILY_PRESETS = {"qwen2-vl": QWEN2_VL_PRESETS, "qwen2.5-vl": PRESETS, "qwen3-vl": QWEN3_VL_PRESETS}


MODEL_TYPES = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}


def size_config(family: str, preset: str) -> dict:
    """A size preset as the fields of its config.json that size the model (`AutoConfig.for_model(**...)`), without
    building a tokenizer: scripts/fit_report.py sizes the real checkpoints from these same presets."""
    spec = preset_spec(family, preset)
    tied = spec["text"]["tie_word_embeddings"]
    return dict(model_type=MODEL_TYPES[family], tie_word_embeddings=tied,
                text_config={**spec["text"], "vocab_size": spec["vocab_size"]}, vision_config=dict(spec["vision"]))


def preset_spec(family: str, preset: str) -> dict:
    if family not in FAMILY_PRESETS:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILY_PRESETS)}")
    if preset not in FAMILY_PRESETS[family]:
        raise ValueError(f"{family} has no preset {preset!r}: one of {', '.join(sorted(FAMILY_PRESETS[family]))}")
    return FAMILY_PRESETS[family][preset]
