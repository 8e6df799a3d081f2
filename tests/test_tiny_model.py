"""scripts/make_tiny_model.py: the offline tiny Qwen2.5-VL is a real, loadable Qwen2.5-VL whose tokenizer, template and
config agree, and the `3b` preset is Qwen/Qwen2.5-VL-3B-Instruct's architecture."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from make_tiny_model import SPECIAL_TOKENS
from model_presets import PRESETS

# head sizes vLLM's attention backends support (vllm/attention: FlashAttention and PagedAttention kernels)
VLLM_HEAD_DIMS = {64, 80, 96, 112, 128, 256}

ID_KEYS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()


def test_loads_with_the_auto_classes(tiny_model, model):
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLProcessor

    assert isinstance(AutoProcessor.from_pretrained(tiny_model), Qwen2_5_VLProcessor)
    config = AutoConfig.from_pretrained(tiny_model)
    assert config.model_type == "qwen2_5_vl"
    assert model.config.vocab_size == config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 5_000_000  # tiny: CPU tests stay fast
    info = json.loads((tiny_model / "tiny_model_info.json").read_text())
    assert info["preset"] == "tiny" and info["parameters"] == n_params


def test_special_token_ids_match_the_config(tiny_model, processor):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    tok = processor.tokenizer
    for key, token in ID_KEYS.items():
        token_id = tok.convert_tokens_to_ids(token)
        assert token_id != tok.unk_token_id
        assert getattr(config, key) == token_id, key
        assert getattr(config.text_config, key) == token_id, f"text_config.{key}"
    assert config.vision_token_id == tok.convert_tokens_to_ids("<|vision_pad|>")
    assert config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert config.pad_token_id == tok.pad_token_id
    # the processor expands the same token the model looks for
    assert processor.image_token == "<|image_pad|>"
    assert processor.image_token_id == config.image_token_id
    # every special token is one token, never split into bytes
    for token in SPECIAL_TOKENS:
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]


def test_generation_config_stops_at_im_end(tiny_model, processor):
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(tiny_model)
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id


def test_chat_template_renders_the_vision_block(processor):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "SYS"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nSYS<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_head_dims_are_vllm_sizes_and_mrope_fits(preset):
    text, vision = PRESETS[preset]["text"], PRESETS[preset]["vision"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert text["hidden_size"] % text["num_attention_heads"] == 0
    assert head_dim in VLLM_HEAD_DIMS
    assert vision["hidden_size"] % vision["num_heads"] == 0
    assert vision["hidden_size"] // vision["num_heads"] in VLLM_HEAD_DIMS
    assert sum(text["rope_scaling"]["mrope_section"]) == head_dim // 2
    assert text["num_attention_heads"] % text["num_key_value_heads"] == 0
    assert vision["out_hidden_size"] == text["hidden_size"]  # the merger projects into the text model


def test_built_config_keeps_the_head_dims(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    text, vision = config.text_config, config.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim in VLLM_HEAD_DIMS
    assert vision.hidden_size // vision.num_heads in VLLM_HEAD_DIMS
    assert sum(text.rope_scaling["mrope_section"]) == head_dim // 2


def test_forward_with_an_image_gives_finite_logits(model, processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", (112, 84), (200, 30, 30))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    n_image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert n_image_tokens == (112 // 28) * (84 // 28)  # one token per merged 28x28 patch
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # the image reaches the logits: another image changes them
    other = processor(text=[text], images=[Image.new("RGB", (112, 84), (0, 0, 255))], return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits, logits)


# ---- the 3b preset: Qwen/Qwen2.5-VL-3B-Instruct's public config.json -------------------------------------------------

QWEN25_VL_3B = {
    "text": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128000,
        "rope_theta": 1000000.0,
        "mrope_section": [16, 24, 24],
        "tie_word_embeddings": True,
        "vocab_size": 151936,
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "window_size": 112,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "ids": {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|vision_pad|>": 151654,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
    },
}


def test_3b_preset_matches_qwen25_vl_3b_instruct():
    from transformers import Qwen2_5_VLConfig

    spec = PRESETS["3b"]
    # special tokens follow the padded regular vocabulary, in Qwen's order: the real ids
    ids = {token: spec["pad_vocab_to"] + i for i, token in enumerate(SPECIAL_TOKENS)}
    assert {t: ids[t] for t in QWEN25_VL_3B["ids"]} == QWEN25_VL_3B["ids"]
    # the config build() makes from the preset (weights are never built here)
    config = Qwen2_5_VLConfig(
        vocab_size=max(len(ids) + spec["pad_vocab_to"], spec.get("vocab_size") or 0),
        vision_config=spec["vision"],
        **spec["text"],
    )
    text, vision = config.text_config, config.vision_config
    expected = QWEN25_VL_3B["text"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rope_theta", "vocab_size"):
        assert getattr(text, key) == expected[key], key
    assert text.rope_scaling["mrope_section"] == expected["mrope_section"]
    assert config.tie_word_embeddings is expected["tie_word_embeddings"]
    for key, value in QWEN25_VL_3B["vision"].items():
        assert getattr(vision, key) == value, f"vision_config.{key}"


def test_fast_random_model_keeps_lm_head_tied():
    """The 3b preset's meta-device build must tie lm_head to the embeddings as Qwen2.5-VL-3B does (3.75 B
    parameters, not 4.07 B), or memory and FLOP figures measured on it are off."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from make_tiny_model import fast_random_model

    spec = PRESETS["tiny"]
    config = Qwen2_5_VLConfig(vocab_size=512, vision_config=spec["vision"], **spec["text"])
    model = fast_random_model(Qwen2_5_VLForConditionalGeneration, config, torch.float32, "cpu", seed=0)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert torch.isfinite(model.lm_head.weight).all() and model.lm_head.weight.std() > 0
