"""The seed's generation path, `--use_vllm --vllm_mode colocate`, through vLLM 0.11.0 itself (CPU build of
`make vllm-cpu`): prompt hand-off (M8), vision-token ban, the seed command under 2-process ZeRO-3 with gradient
checkpointing, weight sync into vLLM and the importance-sampling ratio (M10). Learning through vLLM and the vLLM path
of scripts/evaluate.py are in tests/test_learning.py."""

from __future__ import annotations

import json
import os

import pytest

import _forkserver
from PIL import Image

from _vllm import engine, engine_prompt_ids, require_vllm
from flexai_stub import offline_seed_script_args
from vllm_colocate import PromptMismatchError, check_engine_prompts, collapse_image_pads

IMAGE_PAD = "<|image_pad|>"


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed():
    require_vllm()


def training_prompt_ids(processor, images: list[Image.Image]) -> list[list[int]]:
    """Prompt ids as TRL 1.2.0's GRPOTrainer._tokenize_prompts builds them: the processor's chat template over
    conversations holding the image, tokenized (image placeholders expanded, one per 28x28 patch)."""
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "How many shapes?"}]}]
        for im in images
    ]
    out = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
    return [list(ids) for ids in out["input_ids"]]


IMAGES = [Image.new("RGB", size, color) for size, color in (((56, 56), "red"), ((100, 60), "blue"), ((224, 140), "green"))]


def test_vllm_expands_the_handed_off_prompt_to_exactly_the_training_ids(tiny_model, processor):
    """M8 (trl#6294): what vLLM receives must expand, in vLLM's own input processing, to the ids the trainer scores."""
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    train_ids = training_prompt_ids(processor, IMAGES)
    assert [ids.count(pad) for ids in train_ids] == [4, 8, 40]  # one per 28x28 patch: (56/28)^2, ..., (224/28)*(140/28)

    sent = [{"prompt_token_ids": collapse_image_pads(ids, pad), "multi_modal_data": {"image": im}}
            for ids, im in zip(train_ids, IMAGES)]
    assert engine_prompt_ids(tiny_model, sent) == train_ids

    # What TRL 1.2.0 sends (the expanded ids plus the image): vLLM expands the placeholders a second time.
    unfixed = [{"prompt_token_ids": ids, "multi_modal_data": {"image": im}} for ids, im in zip(train_ids, IMAGES)]
    assert all(len(e) > len(t) for e, t in zip(engine_prompt_ids(tiny_model, unfixed), train_ids))


def test_a_prompt_of_several_images_expands_image_by_image_to_the_training_ids(tiny_model, processor):
    """Several images a prompt (issue 19): each image's run of placeholders is collapsed on its own, and vLLM expands
    each back to that image's tokens, in order."""
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    conversation = [{"role": "user", "content": [*({"type": "image", "image": im} for im in IMAGES),
                                                 {"type": "text", "text": "Which is largest?"}]}]
    out = processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True, return_dict=True)
    train_ids = list(out["input_ids"][0])
    assert train_ids.count(pad) == 4 + 8 + 40
    sent = collapse_image_pads(train_ids, pad)
    assert sent.count(pad) == 3
    assert engine_prompt_ids(tiny_model, [{"prompt_token_ids": sent, "multi_modal_data": {"image": IMAGES}}]) == [train_ids]
    # the control: the images' placeholders handed over in another order than their images (what a collapse that
    # lost track of which run is which image would send) expand to other ids
    swapped = [{"prompt_token_ids": sent, "multi_modal_data": {"image": IMAGES[::-1]}}]
    assert engine_prompt_ids(tiny_model, swapped) != [train_ids]


def test_collapse_keeps_text_and_separate_images():
    assert collapse_image_pads([1, 9, 9, 9, 2, 9, 9, 3, 9], pad_id=9) == [1, 9, 2, 9, 3, 9]
    assert collapse_image_pads([1, 2, 3], pad_id=9) == [1, 2, 3]


def test_a_prompt_vllm_sees_differently_stops_the_run():
    check_engine_prompts([[1, 2, 3]], [[1, 2, 3]])
    with pytest.raises(PromptMismatchError, match=r"prompt 1: vLLM expanded it to 4 tokens, the trainer scores 3"):
        check_engine_prompts([[1], [1, 2, 3]], [[1], [1, 2, 2, 3]])


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>")
# A policy that wants `<|image_pad|>` above everything else (what a drifting model can do): vLLM applies logit_bias
# after bad words (v1/sample/sampler.py), so only a ban that reaches the sampler keeps the token out.
PREFER_IMAGE_PAD = 100.0


def test_vllm_never_samples_vision_tokens_with_the_recipes_generation_kwargs(tiny_model, processor, tmp_path):
    """Training: grpo_vlm.py's generation kwargs, in the shape TRL's colocate mode sends them (n=1 per prompt,
    the prompt repeated num_generations times)."""
    from vllm import SamplingParams

    import grpo_vlm

    script_args, training_args, model_args = grpo_vlm.parse_args(
        offline_seed_script_args(tiny_model, tmp_path / "out", vllm=True)
    )
    grpo_vlm.resolve_args(script_args, training_args, model_args, processor)
    tokenizer = processor.tokenizer
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    vision = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    prompts = [{"prompt_token_ids": tokenizer("Describe the picture.")["input_ids"]}] * 4
    llm = engine(str(tiny_model))

    def sample(**kwargs) -> list[int]:
        params = SamplingParams(n=1, temperature=1.0, max_tokens=16, seed=0, logit_bias={pad: PREFER_IMAGE_PAD},
                                **kwargs)
        return [t for r in llm.generate(prompts, params, use_tqdm=False) for t in r.outputs[0].token_ids]

    assert not vision & set(sample(**training_args.generation_kwargs))
    assert sample().count(pad) > 32  # the control: the biased policy does want the token


def test_evaluation_sampling_keeps_the_ban_with_several_samples_per_question(tiny_model, processor):
    """Evaluation asks vLLM for n samples per question, where vLLM 0.11.0 drops bad_words (M11):
    generation.vllm_sampling_params resolves the ban so the n copies keep it."""
    from generation import GenerationSettings, vllm_sampling_params

    tokenizer = processor.tokenizer
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    vision = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    prompt = {"prompt_token_ids": tokenizer("Describe the picture.")["input_ids"]}
    llm = engine(str(tiny_model))
    settings = GenerationSettings(max_new_tokens=16, temperature=1.0, num_samples=4)

    def sample(params) -> list[int]:
        params.logit_bias, params.seed = {pad: PREFER_IMAGE_PAD}, 0
        return [t for out in llm.generate([prompt], params, use_tqdm=False)[0].outputs for t in out.token_ids]

    assert not vision & set(sample(vllm_sampling_params(llm, settings)))
    # the same params as the user would write them, unresolved: vLLM 0.11.0 samples the banned token
    params = vllm_sampling_params(llm, settings)
    params._bad_words_token_ids = None
    assert sample(params).count(pad) > 32


# ---- the seed command under 2-process ZeRO-3 ----------------------------------------------------------------------


def vllm_seed_args(model, out, steps: int) -> list[str]:
    """The seed's flags with `--use_vllm --vllm_mode colocate`; model, dataset, output dir, steps and completion
    length swapped (64 tokens keep a CPU run under a minute)."""
    return [*offline_seed_script_args(model, out, vllm=True), "--max_steps", str(steps),
            "--max_completion_length", "64"]


# The seed command itself through vLLM colocate runs in tests/test_graceful_stop.py (stopped twice, then finished:
# the adapter's 8 LoRA tensors non-empty, trl#4416) and in tests/test_walkthrough.py (`make smoke`).


@pytest.fixture(scope="module")
def vllm_weight_report(fast_paths_runs):
    """tests/zero3_weight_check.py's report of the fast-paths run (conftest.fast_paths_runs: the seed's vLLM flags,
    the fast paths on as by default, 3 steps of 2 micro-batches, rewards with variance, logs every step): LoRA/base
    changes, the weight sync into vLLM, the logged metrics."""
    report = fast_paths_runs["fast"][0]["weights"]
    assert report is not None, "the fast run recorded no weight report"
    return report


@pytest.mark.slow
def test_vllm_path_updates_every_lora_weight_and_no_base_weight(vllm_weight_report):
    report = vllm_weight_report
    assert report["world_size"] == 2 and report["checkpointing_kwargs_at_end"]["use_reentrant"] is False
    assert len(report["lora_changed"]) == 8 and all(report["lora_changed"].values()), report["lora_changed"]
    assert report["base_changed"], "the recorder compared no base weight: the check below would pass empty"
    assert not [n for n, c in report["base_changed"].items() if c]


@pytest.mark.slow
def test_weights_inside_vllm_are_base_plus_merged_lora(vllm_weight_report):
    sync = vllm_weight_report["vllm_sync"]
    assert len(sync["layers"]) == 2
    for i, layer in enumerate(sync["layers"]):
        for proj in ("q", "v"):
            m = layer[proj]
            # the trained delta is far above bf16 rounding, so a missing or wrong sync cannot pass ...
            assert m["max_abs_delta"] > 4 * m["base_bf16_ulp"], (i, proj, m)
            # ... and vLLM holds base + scale * B @ A up to one bf16 rounding of the sum
            assert m["max_abs_err_vs_merged"] <= m["base_bf16_ulp"], (i, proj, m)
        assert layer["k"]["max_abs_diff_vs_base"] == 0, "k_proj has no LoRA: vLLM's k slice stays the base weight"
    assert sync["trainer_base_changed_after_sync"] == [], "merge + unmerge left the trainer's base weights as they were"


@pytest.mark.slow
def test_importance_sampling_ratio_is_one_when_both_sides_score_the_same_policy(vllm_weight_report):
    """M10: vLLM reports log-probs renormalised over the allowed tokens (bad_words applied first); the trainer now
    masks the same tokens. Before the fix the mean was 0.53 at every step on the tiny model."""
    ratios = [h["sampling/importance_sampling_ratio/mean"] for h in vllm_weight_report["log_history"]
              if "sampling/importance_sampling_ratio/mean" in h]
    assert len(ratios) == 3
    assert all(0.9 <= r <= 1.1 for r in ratios), ratios


# ---- scripts/evaluate.py's vLLM path with a LoRA request -----------------------------------------------------------


@pytest.mark.slow
def test_evaluate_vllm_backend_applies_a_q_v_adapter_as_a_lora_request(tiny_model, tmp_path):
    """q_proj/v_proj adapters (the seed's) reach vLLM as a LoRARequest on the base engine, not merged. Learning
    through vLLM and its evaluation (an lm_head adapter, merged for vLLM) are tests/test_learning.py's."""
    from _tiny import REPO, make_adapter

    adapter = make_adapter(tiny_model)  # random non-zero B: it changes the outputs
    out = tmp_path / "eval"
    # a fork of tests/_forkserver.py's server where the environment allows (the script imports what it preloaded)
    proc = _forkserver.run(
        str(REPO / "scripts" / "evaluate.py"),
        ["--model_name_or_path", tiny_model, "--adapter", adapter, "--dataset_name", "synthetic", "--synthetic_rows",
         "64", "--eval_fraction", "0.1", "--max_samples", "4", "--max_new_tokens", "8", "--backend", "vllm",
         "--output_dir", out, "--no_progress"],
        timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["generation"]["backend"] == "vllm"
    assert report["models"]["adapter"]["path"] == str(adapter), "served as a LoRA request, not merged"
    completions = {label: (out / f"completions-{label}.jsonl").read_text() for label in ("base", "adapter")}
    assert completions["base"] != completions["adapter"], "the adapter changed vLLM's greedy completions"


def test_cpu_thread_binding_workaround_is_never_active_on_a_gpu():
    """M9's workaround replaces vLLM's CPU-worker thread binding on CPU machines only: in one interpreter (vLLM
    imported once; tests/thread_binding_check.py, a fork of tests/_forkserver.py's server), with a GPU reported it
    leaves vLLM's method in place, then without one it replaces it."""
    from _tiny import REPO

    proc = _forkserver.run(str(REPO / "tests" / "thread_binding_check.py"), [], env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-2:] == ["gpu=True upstream", "gpu=False replaced:all"]
