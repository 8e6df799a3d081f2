"""The seed's generation path on the other model families (issue 20): Qwen2-VL and Qwen3-VL tiny models
(make_tiny_model.py --family) through `--use_vllm --vllm_mode colocate` under 2-process ZeRO-3 on CPU, the seed's
flags. One launch per family (tests/zero3_weight_check.py, 2 steps, prompts of two image sizes); every check reads that
launch's report: it trains, vLLM expands the handed-off prompts to the trainer's ids for both sizes (M8), the
importance-sampling ratio stays at 1 (M10), and vLLM holds base + merged LoRA after the sync. Qwen2.5-VL's run of the
same checks is tests/test_vllm_colocate.py's."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from _vllm import require_vllm
from test_train_cpu import FAST, launch_cmd, run
from test_vllm_colocate import vllm_seed_args

# (width, height) of the two images the data holds, and the image tokens each family's processor gives them, worked
# out by hand: sides rounded to multiples of patch x merge, then one token per merged patch.
#   Qwen2-VL (14 x 2 = 28 px): 100x60 -> 112x56 -> 4 x 2 = 8;  224x160 -> 224x168 -> 8 x 6 = 48
#   Qwen3-VL (16 x 2 = 32 px): 100x60 ->  96x64 -> 3 x 2 = 6;  224x160 -> 224x160 -> 7 x 5 = 35
SIZES = [(100, 60), (224, 160)]
IMAGE_TOKENS = {"qwen2-vl": {8, 48}, "qwen3-vl": {6, 35}}
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed():
    require_vllm()


def two_size_jsonl(folder):
    """Two rows, one image of each size: every step's 2 prompts (8 completions over 2 processes, 4 per prompt) are
    the two rows, one per process, so both sizes go through vLLM at every step."""
    folder.mkdir(parents=True)
    lines = []
    for i, (size, color) in enumerate(zip(SIZES, ("red", "blue"))):
        Image.new("RGB", size, color).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": str(folder / f"{i}.png"), "problem": "How many shapes are in the image?",
                                 "solution": "<think>none</think><answer>0</answer>"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


@pytest.fixture(scope="module", params=sorted(IMAGE_TOKENS))
def family_run(request, family_model, tmp_path_factory):
    """(family, report, prompts): tests/zero3_weight_check.py on the seed's vLLM flags plus FAST, 2 steps, on the
    family's tiny model; `prompts` holds every prompt the M8 check compared, from both processes."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"vllm-{family}")
    data = two_size_jsonl(tmp / "data")
    args = [*vllm_seed_args(family_model(family), tmp / "run", STEPS), *FAST, "--dataset_name", str(data),
            "--eval_fraction", "0"]
    run(launch_cmd("tests/zero3_weight_check.py", [tmp / "report.json", *args]))
    prompts = [p for rank in (0, 1) for p in json.loads((tmp / f"report-prompts-rank{rank}.json").read_text())]
    return family, json.loads((tmp / "report.json").read_text()), prompts


@pytest.mark.slow
def test_the_family_trains_its_lora_under_zero3_through_vllm(family_run):
    _, report, _ = family_run
    assert report["world_size"] == 2 and report["global_step"] == STEPS
    # gradient checkpointing (the seed's flag) kept its ZeRO-3 mode through the rollouts (M1, M1')
    assert report["checkpointing_kwargs_at_end"] == {"use_reentrant": False, "determinism_check": "none"}
    assert len(report["lora_changed"]) == 8 and all(report["lora_changed"].values()), report["lora_changed"]
    assert report["base_changed"] and not [n for n, c in report["base_changed"].items() if c]


@pytest.mark.slow
def test_vllm_expands_both_image_sizes_to_the_trainers_prompt_ids(family_run, family_model):
    """M8: the ids vLLM reports it ran equal the ids the trainer scores, for both image sizes."""
    from transformers import AutoConfig

    family, _, prompts = family_run
    pad = AutoConfig.from_pretrained(family_model(family)).image_token_id
    assert len(prompts) == STEPS * 2 * 4  # 2 prompts a step, 4 completions each, one record per completion
    assert {p["trainer"].count(pad) for p in prompts} == IMAGE_TOKENS[family]
    assert all(p["engine"] == p["trainer"] for p in prompts)


@pytest.mark.slow
def test_importance_sampling_ratio_is_one(family_run):
    """M10: vLLM and the trainer score the same policy, vision tokens masked on both sides."""
    _, report, _ = family_run
    ratios = [h["sampling/importance_sampling_ratio/mean"] for h in report["log_history"]
              if "sampling/importance_sampling_ratio/mean" in h]
    assert len(ratios) == STEPS
    assert all(0.9 <= r <= 1.1 for r in ratios), ratios


@pytest.mark.slow
def test_weights_inside_vllm_are_base_plus_merged_lora(family_run):
    _, report, _ = family_run
    sync = report["vllm_sync"]
    assert len(sync["layers"]) == 2
    for i, layer in enumerate(sync["layers"]):
        for proj in ("q", "v"):
            m = layer[proj]
            assert m["max_abs_delta"] > 4 * m["base_bf16_ulp"], (i, proj, m)  # a missing sync cannot pass
            assert m["max_abs_err_vs_merged"] <= m["base_bf16_ulp"], (i, proj, m)
        assert layer["k"]["max_abs_diff_vs_base"] == 0, "k_proj has no LoRA: vLLM's k slice stays the base weight"
    assert sync["trainer_base_changed_after_sync"] == []
