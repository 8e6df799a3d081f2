"""What differs between the model families the recipe trains, read from a model's config and processor.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense) share the chat markup and the vision special tokens, and differ in what the
fixes of this recipe touch: the image processor's patch (14 px for Qwen2/2.5-VL, 16 px for Qwen3-VL; a 2x2 merge for
all three, so one image token per 28x28 or 32x32 pixels), the vision tower (windowed attention in Qwen2.5-VL only),
whether the output head is tied to the input embeddings (by size: Qwen2.5-VL-3B, Qwen3-VL-2B/4B tie it, the 7B/8B and
larger do not), the M-RoPE layout (interleaved in Qwen3-VL; vLLM and transformers read it from the config) and the
chat template (Qwen3-VL's adds no default system message; the processor carries it). Every such fact is read here
from the checkpoint's own files (config.json, the processor), never written down for one model; the other modules ask
this one. How each fix works for each family, or why it cannot, is `FIXES` below (ids: the fix ledger,
experiments/vlm-grpo/INTERNALS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from config_error import ConfigError

# config.model_type -> the family's name. Dense models only: Qwen3-VL's MoE variant (qwen3_vl_moe) routes its MLPs
# through experts that PEFT's q_proj/v_proj LoRA, the ZeRO-3 fixes and the vLLM weight sync were never run on here.
FAMILIES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}

# Tokens only the processor may place (generation.py bans them from sampling: fix ledger M5, M10, M11). The three
# families' tokenizers carry the same strings; `family_of` checks that the config's ids are theirs.
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
IMAGE_TOKEN = "<|image_pad|>"

RELATIVE_BOXES = ("it reads predicted boxes in pixels of the image the model sees (Qwen2.5-VL's frame), {} states "
                  "boxes relative to the image on a 0..1000 scale; use a reward file that scales them "
                  "(--reward_funcs path/to/file.py:function), or a Qwen2.5-VL model")

# Fix -> {model_type: None (it works for the family) or the reason it cannot}. How each works for every family:
FIXES = {
    # M1/M1'/M2: torch checkpointing, DeepSpeed's hooks and TRL's generation context; no model code involved.
    "zero3_checkpointing": {"qwen2_vl": None, "qwen2_5_vl": None, "qwen3_vl": None},
    # vision_attention.py: the three towers' attention modules share one forward (per-window chunks in Qwen2.5-VL,
    # per-image chunks in Qwen2-VL and Qwen3-VL); each class is patched with its own rotary function.
    "batched_vision_attention": {"qwen2_vl": None, "qwen2_5_vl": None, "qwen3_vl": None},
    # M8: vLLM 0.11.0's input processor of all three expands each `<|image_pad|>` it finds into the image's tokens
    # (vllm/model_executor/models/qwen2_vl.py, qwen2_5_vl.py, qwen3_vl.py: _get_prompt_updates); the id collapsed is
    # the config's image_token_id.
    "collapse_image_pads": {"qwen2_vl": None, "qwen2_5_vl": None, "qwen3_vl": None},
    # M10, M5, M11: the vision special tokens, same strings in the three tokenizers.
    "vision_token_mask": {"qwen2_vl": None, "qwen2_5_vl": None, "qwen3_vl": None},
    # the tied-head LoRA refusal reads tie_word_embeddings from the config (`tied_lm_head`).
    "tied_head_lora_refusal": {"qwen2_vl": None, "qwen2_5_vl": None, "qwen3_vl": None},
    # data.py's downscaling and token counts use the processor's smart_resize, patch and merge (`image_geometry`).
    "image_token_budget": {"qwen2_vl": None, "qwen2_5_vl": None, "qwen3_vl": None},
    # rewards.iou_reward reads a predicted box in pixels of the image the model sees, Qwen2.5-VL's grounding frame.
    # Qwen2-VL and Qwen3-VL state boxes in coordinates relative to the image, scaled to 0..1000 (Qwen3-VL's notes:
    # "changed from the absolute coordinates used in Qwen2.5-VL to relative coordinates ranging from 0 to 1000",
    # quoted in QwenLM/Qwen3-VL#1741): their boxes would be scored in the wrong frame.
    "iou_reward": {
        "qwen2_vl": RELATIVE_BOXES.format("Qwen2-VL"),
        "qwen2_5_vl": None,
        "qwen3_vl": RELATIVE_BOXES.format("Qwen3-VL"),
    },
}


@dataclass(frozen=True)
class Family:
    """Facts about one checkpoint: its family and the numbers the recipe's fixes need."""

    model_type: str
    image_token_id: int
    video_token_id: int | None
    vision_start_token_id: int | None
    vision_end_token_id: int | None
    patch_size: int  # vision patch side, pixels (the config's vision_config.patch_size)
    merge_size: int  # patches merged per side into one image token (vision_config.spatial_merge_size)
    tied_lm_head: bool

    @property
    def name(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def pixels_per_token_side(self) -> int:
        """Side of the pixel square one image token covers: 28 for Qwen2/2.5-VL (14 x 2), 32 for Qwen3-VL (16 x 2)."""
        return self.patch_size * self.merge_size


def check_model_type(model_type: str) -> None:
    """One line for a model this recipe does not train."""
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model type {model_type!r} is not supported: this recipe trains the dense Qwen vision-language families "
            f"{', '.join(f'{name} ({t})' for t, name in FAMILIES.items())}"
            + (" (Qwen3-VL's MoE checkpoints are not)" if model_type == "qwen3_vl_moe" else "")
        )


def tied_lm_head(config) -> bool:
    """Whether the output head is the input embeddings' tensor: the top-level flag where the config has one (Qwen3-VL
    keeps it there), else the text config's (Qwen2/2.5-VL mirror it)."""
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = config.get_text_config().tie_word_embeddings
    return bool(tied)


def family_from_config(config) -> Family:
    """The family facts of a loaded `transformers` config (AutoConfig.from_pretrained)."""
    check_model_type(config.model_type)
    text, vision = config.get_text_config(), config.vision_config

    def token_id(key):
        value = getattr(config, key, None)
        return value if value is not None else getattr(text, key, None)

    return Family(
        model_type=config.model_type,
        image_token_id=token_id("image_token_id"),
        video_token_id=token_id("video_token_id"),
        vision_start_token_id=token_id("vision_start_token_id"),
        vision_end_token_id=token_id("vision_end_token_id"),
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        tied_lm_head=tied_lm_head(config),
    )


def family_of(model_args) -> Family:
    """The family of `--model_name_or_path` (its config only: no weights load)."""
    from vllm_colocate import model_config

    return family_from_config(model_config(model_args))


def check_processor(family: Family, processor) -> None:
    """The processor and the config describe the same model: its image token is the config's id, its patch and merge
    are the vision tower's. A mismatch (a processor of another family saved next to the weights) would make every
    image's token count wrong: refused in one line."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != family.image_token_id:
        raise ConfigError(
            f"the tokenizer's {IMAGE_TOKEN} is id {image_token_id}, the model config's image_token_id is "
            f"{family.image_token_id}: the processor does not belong to this {family.name} checkpoint"
        )
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return
    geometry = (image_processor.patch_size, image_processor.merge_size)
    if geometry != (family.patch_size, family.merge_size):
        raise ConfigError(
            f"the image processor cuts {geometry[0]}-px patches merged {geometry[1]}x{geometry[1]}, the vision tower "
            f"expects {family.patch_size}-px patches merged {family.merge_size}x{family.merge_size}: the processor "
            f"does not belong to this {family.name} checkpoint"
        )


def check_fixes(family: Family, requested: list[str]) -> None:
    """Refuse, in one line with the reason, a run that needs a fix which cannot work for this family (today: the iou
    reward's pixel frame on Qwen2-VL and Qwen3-VL; the other fixes work for the three families, tests/test_families.py
    and tests/test_vllm_families.py)."""
    for fix in requested:
        reason = FIXES[fix][family.model_type]
        if reason is not None:
            raise ConfigError(f"{fix} cannot work for {family.name}: {reason}")


def image_geometry(image_processor) -> tuple[int, int, int, int]:
    """(patch, merge, min_pixels, max_pixels) of a Qwen image processor: the numbers its resize and token count use
    (patch 14 or 16, merge 2). min/max_pixels where set, else the `size` dict's shortest/longest edge (Qwen3-VL's
    preprocessor_config.json states only that)."""
    patch, merge = image_processor.patch_size, image_processor.merge_size
    min_pixels = getattr(image_processor, "min_pixels", None)
    max_pixels = getattr(image_processor, "max_pixels", None)
    size = getattr(image_processor, "size", None) or {}
    min_pixels = min_pixels if min_pixels is not None else size["shortest_edge"]
    max_pixels = max_pixels if max_pixels is not None else size["longest_edge"]
    return patch, merge, min_pixels, max_pixels
