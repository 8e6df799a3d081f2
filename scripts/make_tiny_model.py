#!/usr/bin/env python
"""Build a random-weights Qwen2-VL, Qwen2.5-VL or Qwen3-VL (model + processor) offline, in seconds.

    python scripts/make_tiny_model.py OUT_DIR                 # tiny: ~2M parameters, for CPU tests and `make smoke`
    python scripts/make_tiny_model.py OUT_DIR --preset 3b     # Qwen2.5-VL-3B-Instruct's architecture (bench, GPU tests)
    python scripts/make_tiny_model.py OUT_DIR --preset tiny-untied --box_answer_steps 150   # answers in box form
    python scripts/make_tiny_model.py OUT_DIR --family qwen3-vl               # a tiny Qwen3-VL (16-px patches)
    python scripts/make_tiny_model.py OUT_DIR --family qwen3-vl --preset 8b   # Qwen3-VL-8B-Instruct's architecture

Nothing is downloaded: the tokenizer is a byte-level BPE generated here, carrying Qwen's special tokens
(`<|im_start|>`, `<|vision_start|>`, `<|image_pad|>` ...) at the ids the model config points at, and Qwen2-VL's
chat template (Qwen3-VL's own for `--family qwen3-vl`), so the real loading, templating and image-token expansion
code paths all run. The size presets (`3b`, `7b`, `32b` of Qwen2.5-VL; `2b`, `7b` of Qwen2-VL; `2b`, `4b`, `8b` of
Qwen3-VL) use the public config values of the matching `-Instruct` checkpoints and pad the vocabulary to its full size,
so FLOP and memory figures measured on them are those of the real models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model_presets import DEFAULT_FAMILY, FAMILY_PRESETS, preset_spec

# Qwen2's special tokens, in Qwen's order (their ids follow the regular vocabulary, as in the real tokenizer).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL / Qwen2.5-VL chat template (as shipped in the model's chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the BPE merges are learned from: the words the synthetic task and the system prompt use, so prompts
# tokenize into a realistic number of tokens rather than one token per byte.
_CORPUS = [
    "You are a helpful assistant. A conversation between User and Assistant. The user asks a question about "
    "the image, and the Assistant solves it. The Assistant first thinks about the reasoning process and then "
    "provides the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively.",
    "How many red green blue yellow circles squares triangles are in the image? Answer with a number.",
    "What number is written in the image? What is the sum of the digits shown? the a an of in is are",
    "<think> I count the shapes one by one. </think> <answer> 0 1 2 3 4 5 6 7 8 9 10 11 12 </answer>",
    "\\boxed{42} \\frac{1}{2} x + y = z, 3.14 -7 100%",
]

def qwen3_vl_chat_template() -> str:
    """Qwen3-VL's chat template as its checkpoints ship it, from the pinned TRL (trl/chat_templates/qwen3_vl.jinja,
    "Original Qwen3-VL chat template"): unlike Qwen2/2.5-VL's, it adds no default system message."""
    from importlib.resources import files

    return files("trl").joinpath("chat_templates", "qwen3_vl.jinja").read_text()


def build_tokenizer(bpe_vocab: int, pad_vocab_to: int | None, chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE with Qwen's special tokens appended after the regular vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if pad_vocab_to:
        # Unreachable filler entries: they give the embedding and LM head the real model's shape. They go into the
        # BPE vocabulary itself (no merge produces them): as added tokens, tokenizers 0.22.1 (the pinned stack) spent
        # over 9 minutes adding 150k of them (an H200 host's CPU).
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(pad_vocab_to - len(vocab)):
            vocab[f"<|filler_{i}|>"] = len(vocab)
        tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
        padding_side="left",
    )
    fast.chat_template = chat_template
    return fast


def fast_random_model(model_cls, config, dtype, device: str, seed: int):
    """The model with N(0, initializer_range) matrices, unit norms and zero biases, filled in place.

    The regular constructor initialises every weight twice (torch's Linear init, then transformers' _init_weights)
    in float32: minutes for the 3b preset's 3.75 B weights on CPU, and a first device run spent its whole 10 minutes
    there. Building on the meta device and filling the weights once in their final dtype avoids both.
    """
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()  # to_empty gives every parameter its own storage: re-share lm_head with the embeddings
    generator = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)  # RMSNorm / LayerNorm scales
            else:
                param.normal_(0.0, std, generator=generator)
    # Non-persistent buffers (rotary inverse frequencies) are left unset: they are not saved, and loading the
    # folder recomputes them.
    return model


# transformers' classes of each family: configuration, model, processor, video processor.
FAMILY_CLASSES = {
    "qwen2-vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2.5-vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                   "Qwen2VLVideoProcessor"),
    "qwen3-vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}


def build(out_dir: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "bfloat16", device: str = "cpu",
          family: str = DEFAULT_FAMILY) -> Path:
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig, Qwen2VLImageProcessorFast

    spec = preset_spec(family, preset)
    config_cls, model_cls, processor_cls, video_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
    chat_template = qwen3_vl_chat_template() if family == "qwen3-vl" else CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec["bpe_vocab"], spec["pad_vocab_to"], chat_template)
    tokenizer.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)  # what users of OUT_DIR get: proves the saved files load
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    vocab_size = max(len(tokenizer), spec.get("vocab_size") or 0)
    token_ids = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen3-vl":
        # Qwen3-VL's config holds the text model's settings in text_config only; the head's tying sits at the top.
        config = config_cls(
            text_config={**spec["text"], "vocab_size": vocab_size, **token_ids},
            vision_config=spec["vision"],
            tie_word_embeddings=spec["text"]["tie_word_embeddings"],
            torch_dtype=dtype,
            **vision_ids,
        )
    else:
        config = config_cls(
            vocab_size=vocab_size,
            **token_ids,
            **vision_ids,
            vision_token_id=ids["<|vision_pad|>"],
            vision_config=spec["vision"],
            torch_dtype=dtype,
            **spec["text"],
        )
        # Mirror the ids into the text sub-config too: some code paths (vLLM, generation) read them from there.
        for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config.text_config, key, getattr(config, key))
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            setattr(config.text_config, key, getattr(config, key))

    torch.manual_seed(seed)
    if preset.startswith("tiny"):
        model = model_cls(config).to(getattr(torch, dtype))
    else:
        model = fast_random_model(model_cls, config, getattr(torch, dtype), device, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id if family != "qwen3-vl" else token_ids["bos_token_id"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=config.pad_token_id if family != "qwen3-vl" else token_ids["pad_token_id"],
        do_sample=True,
        temperature=1.0,
    )
    model.save_pretrained(out, safe_serialization=True)

    vision = spec["vision"]
    side = vision["patch_size"] * vision["spatial_merge_size"]  # pixels per merged image token's side: 28, or 32
    # Small images keep CPU runs fast: at most 256 merged tokens (one per side x side pixels) per image for the tiny
    # presets; the real checkpoints' limits otherwise.
    if preset.startswith("tiny"):
        max_pixels = 256 * side * side
    else:
        max_pixels = 16777216 if family == "qwen3-vl" else 12845056
    processor_kwargs = dict(min_pixels=4 * side * side, max_pixels=max_pixels, patch_size=vision["patch_size"],
                            merge_size=vision["spatial_merge_size"], temporal_patch_size=vision["temporal_patch_size"])
    if family == "qwen3-vl":
        # Qwen3-VL's preprocessor_config.json: mean and std 0.5 (Qwen2/2.5-VL use CLIP's)
        image_processor = Qwen2VLImageProcessorFast(**processor_kwargs, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        video_processor = video_cls()
    else:
        image_processor = Qwen2VLImageProcessorFast(**processor_kwargs)
        video_processor = video_cls(min_pixels=4 * side * side, max_pixels=max_pixels)
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=chat_template
    )
    processor.save_pretrained(out)
    info = {"preset": preset, "seed": seed, "parameters": sum(p.numel() for p in model.parameters())}
    if family != DEFAULT_FAMILY:
        info = {"family": family, **info}
    (out / "tiny_model_info.json").write_text(json.dumps(info, indent=2))
    return out


# The answer the box warm-up teaches: the `format` reward's form with a grounding box, the think part fixed and short.
BOX_ANSWER = "<think>I look.</think><answer>[{}, {}, {}, {}]</answer>"


def random_box(rng, side: int) -> tuple[int, int, int, int]:
    """A box anywhere in a side x side image, 8 pixels to the whole image on each side: wide on purpose, so the
    boxes the taught model samples are as often far from a grounding gold box as near it."""
    x1, y1 = rng.randrange(side - 8), rng.randrange(side - 8)
    return x1, y1, rng.randint(x1 + 8, side), rng.randint(y1 + 8, side)


def teach_box_answers(model_dir: str | Path, steps: int = 150, seed: int = 0, batch_size: int = 16,
                      learning_rate: float = 3e-3) -> dict:
    """Supervised warm-up, in place: the model learns to answer the `grounding` dataset's questions (real prompts,
    images and chat template, as GRPO will ask them) with `BOX_ANSWER` around a random box drawn afresh at every step,
    independent of the image and the question. A random-weights model never writes a box, so the `format` and `iou`
    rewards are 0 for all its completions and GRPO has no signal; after this it writes a box every time and the box
    varies, so `iou` has variance to learn from, yet nothing about where the shapes are has been taught. Full
    fine-tuning in float32, saved in the folder's dtype; seconds on a CPU for the tiny presets. Returns the loss
    before and after."""
    import random
    import shutil
    import sys
    import tempfile

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code" / "vlm-grpo"))
    from data import make_prompt
    from synthetic_data import grounding_example

    model_dir = Path(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    saved_dtype = json.loads((model_dir / "config.json").read_text()).get("torch_dtype", "bfloat16")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    side = 112  # synthetic_data's default image side, the one `--dataset_name grounding` draws
    rows = [grounding_example(rng, side)[:2] for _ in range(64)]
    prompts = []
    for image, problem in rows:
        messages = make_prompt(problem)
        messages[1]["content"] = [{"type": "image"}, {"type": "text", "text": problem}]  # TRL's image placement
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    tokenizer.padding_side = "right"
    losses, prompt_len = [], {}
    model.train()
    for _ in range(steps):
        picks = [rng.randrange(len(rows)) for _ in range(batch_size)]
        answers = [BOX_ANSWER.format(*random_box(rng, side)) + tokenizer.eos_token for _ in picks]
        for i in set(picks) - set(prompt_len):  # once a row: 16 processor calls a step cost more than the step
            prompt_len[i] = len(processor(text=[prompts[i]], images=[rows[i][0]])["input_ids"][0])
        prompt_lens = [prompt_len[i] for i in picks]
        batch = processor(text=[prompts[i] + a for i, a in zip(picks, answers)], images=[rows[i][0] for i in picks],
                          padding=True, return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for row, n in enumerate(prompt_lens):
            labels[row, :n] = -100  # learn the answer only
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with tempfile.TemporaryDirectory() as tmp:
        # the weights only: a reloaded config saved again loses its top-level image/video/vision token ids
        # (transformers 4.57), which generate() needs to count the images of a prompt
        model.to(getattr(torch, saved_dtype)).save_pretrained(tmp, safe_serialization=True)
        shutil.move(Path(tmp) / "model.safetensors", model_dir / "model.safetensors")
    info_file = model_dir / "tiny_model_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    info["box_answer_warmup"] = {"steps": steps, "seed": seed, "batch_size": batch_size, "learning_rate": learning_rate,
                                 "answer": BOX_ANSWER, "loss_first": losses[0], "loss_last": losses[-1]}
    info_file.write_text(json.dumps(info, indent=2))
    return info["box_answer_warmup"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the model, tokenizer and processor into")
    parser.add_argument("--family", choices=list(FAMILY_PRESETS), default=DEFAULT_FAMILY, help="model family")
    parser.add_argument("--preset", default="tiny",
                        help="architecture size: "
                        + "; ".join(f"{f}: {', '.join(sorted(p))}" for f, p in FAMILY_PRESETS.items()))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights dtype")
    parser.add_argument("--device", default="cpu", help="where the weights are initialised, e.g. cuda (much faster)")
    parser.add_argument("--box_answer_steps", type=int, default=0,
                        help="then teach the answer form <think>…</think><answer>[x1, y1, x2, y2]</answer> with random "
                             "boxes in this many supervised steps (teach_box_answers), for learning tests with `iou`")
    args = parser.parse_args()
    if args.preset not in FAMILY_PRESETS[args.family]:
        parser.error(f"--family {args.family} has no preset {args.preset!r}: one of "
                     f"{', '.join(sorted(FAMILY_PRESETS[args.family]))}")
    print(build(args.out_dir, args.preset, args.seed, args.dtype, args.device, args.family))
    if args.box_answer_steps:
        print(teach_box_answers(args.out_dir, args.box_answer_steps, args.seed))


if __name__ == "__main__":
    main()
