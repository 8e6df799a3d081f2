"""Model families (issue 20): code/vlm-grpo/families.py reads what differs between Qwen2-VL, Qwen2.5-VL and Qwen3-VL from
a checkpoint's config and processor, and scripts/make_tiny_model.py --family builds a tiny model of each with its real
processor layout, special tokens and chat template. Expected numbers are worked out by hand in the comments."""

from __future__ import annotations


import pytest
import torch
from PIL import Image

from config_error import ConfigError
from make_tiny_model import SPECIAL_TOKENS
from model_presets import FAMILY_PRESETS, preset_spec

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
MODEL_TYPE = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}
# head sizes vLLM's attention backends support (as tests/test_tiny_model.py)
VLLM_HEAD_DIMS = {64, 80, 96, 112, 128, 256}

# Two image sizes, (width, height), and the tokens each family spends on them. The processor resizes each side to the
# nearest multiple of patch x merge (smart_resize, within min/max pixels), then one token per merged patch:
#   28 px (Qwen2/2.5-VL, 14 x 2): 100x60 -> 112x56 -> 4 x 2 = 8;  224x160 -> 224x168 -> 8 x 6 = 48
#   32 px (Qwen3-VL,     16 x 2): 100x60 ->  96x64 -> 3 x 2 = 6;  224x160 -> 224x160 -> 7 x 5 = 35
SIZES = [(100, 60), (224, 160)]
IMAGE_TOKENS = {"qwen2-vl": [8, 48], "qwen2.5-vl": [8, 48], "qwen3-vl": [6, 35]}


def load_processor(folder):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, padding_side="left")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_with_its_processor_and_runs_an_image(family, family_model):
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = family_model(family)
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == MODEL_TYPE[family]
    processor = load_processor(folder)
    assert type(processor).__name__ == {"qwen2-vl": "Qwen2VLProcessor", "qwen2.5-vl": "Qwen2_5_VLProcessor",
                                        "qwen3-vl": "Qwen3VLProcessor"}[family]
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) < 5_000_000  # tiny: CPU tests stay fast
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", SIZES[0], "red")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_expand_to_the_count_patch_and_merge_predict(family, family_model):
    from data import image_token_count
    from families import family_from_config
    from transformers import AutoConfig

    folder = family_model(family)
    processor = load_processor(folder)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = []
    for size in SIZES:
        conversation = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", size, "blue")},
                                                     {"type": "text", "text": "How many?"}]}]
        ids = processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"][0]
        counts.append(list(ids).count(pad))
    assert counts == IMAGE_TOKENS[family]
    # the recipe's own count (data.py, the token budget and --max_prompt_length filter) agrees without the processor
    assert [image_token_count(w, h, processor.image_processor) for w, h in SIZES] == IMAGE_TOKENS[family]
    family_facts = family_from_config(AutoConfig.from_pretrained(folder))
    assert family_facts.pixels_per_token_side == (32 if family == "qwen3-vl" else 28)
    assert family_facts.image_token_id == pad
    tok = processor.tokenizer
    assert (family_facts.vision_start_token_id, family_facts.vision_end_token_id, family_facts.video_token_id) == (
        tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>"),
        tok.convert_tokens_to_ids("<|video_pad|>"))


def test_chat_templates_are_each_familys_own(family_model):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    rendered = {f: load_processor(family_model(f)).apply_chat_template(conversation, add_generation_prompt=True,
                                                                        tokenize=False) for f in FAMILIES}
    block = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n"
    # Qwen2/2.5-VL add a default system message; Qwen3-VL's template does not
    assert rendered["qwen2-vl"] == rendered["qwen2.5-vl"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + block)
    assert rendered["qwen3-vl"] == block
    with_system = [{"role": "system", "content": "SYS"}, *conversation]
    text = load_processor(family_model("qwen3-vl")).apply_chat_template(with_system, add_generation_prompt=True,
                                                                        tokenize=False)
    assert text == "<|im_start|>system\nSYS<|im_end|>\n" + block


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_are_single_tokens_at_the_configs_ids(family, family_model):
    from transformers import AutoConfig

    folder = family_model(family)
    config, tok = AutoConfig.from_pretrained(folder), load_processor(folder).tokenizer
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert getattr(config, key) == tok.convert_tokens_to_ids(token), key
    for token in SPECIAL_TOKENS:
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


# ---- the size presets: public config.json values of the -Instruct checkpoints -----------------------------------

# (family, preset): (text hidden size, layers, attention heads, KV heads, head_dim, tied head, embedding rows,
#                    vision patch)
REAL = {
    ("qwen2.5-vl", "3b"): (2048, 36, 16, 2, 128, True, 151936, 14),
    ("qwen2.5-vl", "7b"): (3584, 28, 28, 4, 128, False, 152064, 14),
    ("qwen2.5-vl", "32b"): (5120, 64, 40, 8, 128, False, 152064, 14),
    ("qwen2-vl", "2b"): (1536, 28, 12, 2, 128, True, 151936, 14),
    ("qwen2-vl", "7b"): (3584, 28, 28, 4, 128, False, 152064, 14),
    ("qwen3-vl", "2b"): (2048, 28, 16, 8, 128, True, 151936, 16),
    ("qwen3-vl", "4b"): (2560, 36, 32, 8, 128, True, 151936, 16),
    ("qwen3-vl", "8b"): (4096, 36, 32, 8, 128, False, 151936, 16),
}


@pytest.mark.parametrize("family,preset", sorted(REAL))
def test_size_presets_are_the_real_architectures(family, preset):
    import transformers

    from families import family_from_config
    from make_tiny_model import FAMILY_CLASSES

    spec = preset_spec(family, preset)
    hidden, layers, heads, kv, head_dim, tied, rows, patch = REAL[family, preset]
    config_cls = getattr(transformers, FAMILY_CLASSES[family][0])
    if family == "qwen3-vl":
        config = config_cls(text_config={**spec["text"], "vocab_size": spec["vocab_size"]}, vision_config=spec["vision"],
                            tie_word_embeddings=spec["text"]["tie_word_embeddings"])
    else:
        config = config_cls(vocab_size=spec["vocab_size"], vision_config=spec["vision"], **spec["text"])
    text = config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        hidden, layers, heads, kv)
    assert (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) == head_dim
    assert text.vocab_size == rows
    assert spec["pad_vocab_to"] + SPECIAL_TOKENS.index("<|image_pad|>") == 151655  # the real image_pad id
    facts = family_from_config(config)
    assert facts.tied_lm_head is tied and facts.patch_size == patch and facts.merge_size == 2
    assert sum(text.rope_scaling["mrope_section"]) == head_dim // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_presets_have_vllm_head_sizes(family):
    for name in ("tiny", "tiny-untied"):
        spec = FAMILY_PRESETS[family][name]
        text, vision = spec["text"], spec["vision"]
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        assert head_dim in VLLM_HEAD_DIMS and sum(text["rope_scaling"]["mrope_section"]) == head_dim // 2
        vision_width = vision.get("embed_dim") or vision["hidden_size"]  # Qwen2-VL names it embed_dim
        assert vision_width // vision["num_heads"] in VLLM_HEAD_DIMS
    assert FAMILY_PRESETS[family]["tiny-untied"]["text"]["tie_word_embeddings"] is False


def test_an_unknown_preset_of_a_family_is_refused_in_one_line(tmp_path):
    import sys

    import _proc
    from _tiny import REPO

    proc = _proc.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(tmp_path / "m"),
                     "--family", "qwen3-vl", "--preset", "3b"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("--family qwen3-vl has no preset '3b': one of 2b, 4b, 8b, "
                                                         "tiny, tiny-untied")


# ---- refusals -----------------------------------------------------------------------------------------------------


def test_an_unsupported_model_type_is_refused_in_one_line_naming_the_supported_ones():
    from transformers import Qwen3VLMoeConfig, LlavaConfig

    from families import family_from_config

    with pytest.raises(ConfigError) as err:
        family_from_config(Qwen3VLMoeConfig())
    message = str(err.value)
    assert "\n" not in message
    assert message == ("model type 'qwen3_vl_moe' is not supported: this recipe trains the dense Qwen vision-language "
                       "families Qwen2-VL (qwen2_vl), Qwen2.5-VL (qwen2_5_vl), Qwen3-VL (qwen3_vl) (Qwen3-VL's MoE "
                       "checkpoints are not)")
    with pytest.raises(ConfigError, match=r"^model type 'llava' is not supported"):
        family_from_config(LlavaConfig())


def test_a_processor_of_another_family_is_refused(family_model):
    from transformers import AutoConfig

    from families import check_processor, family_from_config

    qwen3 = family_from_config(AutoConfig.from_pretrained(family_model("qwen3-vl")))
    check_processor(qwen3, load_processor(family_model("qwen3-vl")))
    with pytest.raises(ConfigError, match=r"^the image processor cuts 14-px patches merged 2x2, the vision tower "
                                          r"expects 16-px patches merged 2x2"):
        check_processor(qwen3, load_processor(family_model("qwen2.5-vl")))


def test_the_seed_command_on_each_family_passes_setup(family_model, tmp_path):
    """grpo_vlm.setup (every check before weights load) on each tiny family, with the seed's flags; it installs the
    batched vision attention on each family's attention class."""
    import grpo_vlm
    import vision_attention
    from flexai_stub import offline_seed_script_args

    for family in FAMILIES:
        args = grpo_vlm.parse_args(offline_seed_script_args(family_model(family), tmp_path / family, vllm=True))
        assert grpo_vlm.requested_fixes(*args) == ["vision_token_mask", "image_token_budget", "zero3_checkpointing",
                                                   "batched_vision_attention", "collapse_image_pads",
                                                   "tied_head_lora_refusal"]
        grpo_vlm.setup(*args)
        assert vision_attention.attention_class(MODEL_TYPE[family]).forward is vision_attention._forward


def test_a_fix_that_cannot_work_for_a_family_is_refused_in_one_line(family_model, monkeypatch):
    """The refusal path, with a reason put in the table for the test (every fix but the iou reward works for the three
    families)."""
    from transformers import AutoConfig

    import families

    qwen3 = families.family_from_config(AutoConfig.from_pretrained(family_model("qwen3-vl")))
    families.check_fixes(qwen3, [fix for fix in families.FIXES if fix != "iou_reward"])
    monkeypatch.setitem(families.FIXES, "collapse_image_pads", {**families.FIXES["collapse_image_pads"],
                                                                "qwen3_vl": "a reason"})
    with pytest.raises(ConfigError) as err:
        families.check_fixes(qwen3, ["collapse_image_pads"])
    assert str(err.value) == "collapse_image_pads cannot work for Qwen3-VL: a reason"


def test_lora_on_a_tied_head_is_refused_from_the_config_of_each_family(family_model, tmp_path):
    import grpo_vlm
    from flexai_stub import offline_seed_script_args

    for family in FAMILIES:
        argv = [*offline_seed_script_args(family_model(family), tmp_path / family, vllm=True)]
        i = argv.index("--lora_target_modules")
        argv[i + 1 : i + 3] = ["lm_head"]
        with pytest.raises(ConfigError, match="ties lm_head to its input embeddings"):
            grpo_vlm.setup(*grpo_vlm.parse_args(argv))


def test_the_iou_reward_is_refused_for_families_that_state_relative_boxes(family_model, tmp_path):
    """iou reads boxes in pixels of the model's image (Qwen2.5-VL); Qwen2-VL and Qwen3-VL write 0..1000 coordinates."""
    import grpo_vlm
    from flexai_stub import offline_seed_script_args

    def setup(family):
        argv = [*offline_seed_script_args(family_model(family), tmp_path / family, vllm=True),
                "--dataset_name", "grounding", "--reward_funcs", "format", "iou"]
        grpo_vlm.setup(*grpo_vlm.parse_args(argv))

    setup("qwen2.5-vl")
    for family, name in (("qwen2-vl", "Qwen2-VL"), ("qwen3-vl", "Qwen3-VL")):
        with pytest.raises(ConfigError) as err:
            setup(family)
        assert str(err.value).startswith(f"iou_reward cannot work for {name}: it reads predicted boxes in pixels of "
                                         f"the image the model sees (Qwen2.5-VL's frame), {name} states boxes relative "
                                         "to the image on a 0..1000 scale")


@pytest.mark.parametrize("tied", [True, False])
def test_the_size_presets_fast_build_ties_qwen3_vls_head_as_its_config_says(tied):
    """Qwen3-VL-2B/4B tie lm_head to the embeddings, the 8B does not: make_tiny_model's meta-device build (used for
    the size presets) must keep that, or memory figures measured on them are off."""
    import transformers

    from make_tiny_model import fast_random_model

    spec = FAMILY_PRESETS["qwen3-vl"]["tiny" if tied else "tiny-untied"]
    config = transformers.Qwen3VLConfig(text_config={**spec["text"], "vocab_size": 512}, vision_config=spec["vision"],
                                        tie_word_embeddings=tied)
    model = fast_random_model(transformers.Qwen3VLForConditionalGeneration, config, torch.float32, "cpu", seed=0)
    shared = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert shared is tied
