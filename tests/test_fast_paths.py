"""code/vlm-grpo/fast_paths.py through the real vLLM colocate path (CPU build), 2-process ZeRO-3, tiny model; and its
parts on their own (persistent weights kept bit for bit by the sync, each distinct image preprocessed once).

Two runs of the seed's flags with vLLM, identical but for `--no_vllm_fast_paths` (TRL's paths) and the default
(fast paths on), each 3 optimizer steps of 2 micro-batches (one generation per step, so the importance-sampling
ratio is pooled over 2 micro-batches per rank, the case where a per-micro-batch shortcut would go wrong).
`--lora_dropout 0`: with TRL's default 0.05 the extra forward draws its own dropout masks and consumes the random
stream that vLLM's sampler shares in colocate mode, so the two runs would sample different completions from step 2
and could not be compared token for token.

This file is also the worker both runs launch (`accelerate launch tests/test_fast_paths.py REPORT.json ARGS`): it
counts the no-grad log-prob forwards and their time, keeps TRL's logged metrics, and then checks the weight sync:
TRL's whole-model sync into vLLM, a snapshot of vLLM's weights, every vLLM weight overwritten with NaN, the
layer-by-layer sync, and a bitwise comparison with the snapshot; at every hand-off the bytes of ZeRO-3 parameters
gathered at that moment are summed (DeepSpeed's own `ds_status`), for both syncs.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
# 2 completions per micro-batch, 2 micro-batches per optimizer step and per generation (steps_per_generation
# defaults to gradient_accumulation_steps): 8 completions per generation over 2 processes = 2 prompts x 4. Rewards
# that depend only on the text (no math-verify timeouts, which a loaded machine can hit in one run and not the other).
ARGS = ["--max_completion_length", "24", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--num_generations", "4", "--learning_rate", "1e-3", "--reward_funcs", "digit_ratio", "format",
        "--logging_steps", "1", "--report_to", "none", "--lora_dropout", "0", "--save_strategy", "no"]
# TRL's metrics the cut must leave unchanged
METRICS = ["loss", "reward", "entropy", "clip_ratio/region_mean", "clip_ratio/low_mean",
           "clip_ratio/high_mean", "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
           "sampling/importance_sampling_ratio/max", "sampling/sampling_logp_difference/mean",
           "sampling/sampling_logp_difference/max"]
# Both paths compute the same log-probs from the same weights and ids: the extra forward runs without checkpointing
# and under no_grad, on the same padded micro-batch shapes. What may differ is the order of float sums (the pooled
# mean over 2 micro-batches), so 1e-5 relative, far below the metrics' step-to-step changes.
REL_TOL = 1e-5


# ---- worker (under accelerate launch) -------------------------------------------------------------------------------


def gathered_bytes(model) -> int:
    """Bytes of ZeRO-3 partitioned parameters whole on this rank right now (persistent ones excluded: always whole)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel * p.element_size() for p in model.parameters()
               if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE and not getattr(p, "ds_persist", False))


def sync_check(trainer) -> dict:
    import torch

    gen = trainer.vllm_generation
    llm_model = gen.llm.llm_engine.model_executor.driver_worker.model_runner.model
    peaks = {"upstream": 0, "layerwise": 0}
    load_weights, which = llm_model.load_weights, {"name": None}

    def probed(weights):
        peaks[which["name"]] = max(peaks[which["name"]], gathered_bytes(trainer.model))
        return load_weights(weights)

    llm_model.load_weights = probed
    which["name"] = "upstream"
    gen.sync_weights.upstream()
    snapshot = {n: p.detach().clone() for n, p in llm_model.named_parameters()}
    with torch.no_grad():
        for p in llm_model.parameters():
            p.fill_(float("nan"))
    which["name"] = "layerwise"
    report = gen.sync_weights()
    llm_model.load_weights = load_weights
    after = dict(llm_model.named_parameters())
    return {
        "vllm_params": len(snapshot),
        "bitwise_equal": sum(torch.equal(after[n], t) for n, t in snapshot.items()),
        "left_nan": sorted(n for n, p in after.items() if torch.isnan(p).any()),
        "gathered_bytes_at_handoff": peaks,
        "partitioned_bytes": sum(p.ds_numel * p.element_size() for p in trainer.model.parameters()
                                 if not getattr(p, "ds_persist", False)),
        "layerwise_report": report,
        # ZeRO-3 keeps CPU runs' parameters in float32 (mixed precision is off on CPU, grpo_vlm.make_parser)
        "bytes_per_element": next(trainer.model.parameters()).element_size(),
    }


def worker(report_path: Path, argv: list[str]) -> None:
    import torch

    sys.path.insert(0, str(REPO / "code" / "vlm-grpo"))
    import grpo_vlm
    from trainer import VLMGRPOTrainer

    nograd = {"calls": 0, "sequences": 0, "seconds": 0.0}
    upstream = VLMGRPOTrainer._get_per_token_logps_and_entropies

    def counted(self, model, input_ids, *args, **kwargs):
        if torch.is_grad_enabled():
            return upstream(self, model, input_ids, *args, **kwargs)
        t0 = time.perf_counter()
        out = upstream(self, model, input_ids, *args, **kwargs)
        nograd["seconds"] += time.perf_counter() - t0
        nograd["calls"] += 1
        nograd["sequences"] += input_ids.shape[0]
        return out

    VLMGRPOTrainer._get_per_token_logps_and_entropies = counted
    script_args, training_args, model_args = grpo_vlm.parse_args(argv)
    processor = grpo_vlm.setup(script_args, training_args, model_args)
    t0 = time.perf_counter()
    sys.path.insert(0, str(REPO / "tests"))
    from zero3_weight_check import WeightRecorder, weights_report

    recorder = WeightRecorder()
    trainer = grpo_vlm.train(script_args, training_args, model_args, processor, callbacks=[recorder])
    train_s = time.perf_counter() - t0
    # test_vllm_colocate.py's weight checks (LoRA and base changes, vLLM's weights after a sync) read this run's report
    weights = weights_report(trainer, recorder, model_args, training_args) if trainer.layerwise_weight_sync else None
    sync = sync_check(trainer) if trainer.layerwise_weight_sync else None
    report = {"rank": trainer.accelerator.process_index, "reuse_loss_logps": trainer.reuse_loss_logps,
              "layerwise_weight_sync": trainer.layerwise_weight_sync, "dedupe_images": trainer.dedupe_images,
              "nograd_logps": nograd, "train_s": train_s,
              "log_history": trainer.state.log_history, "sync": sync, "weights": weights}
    Path(f"{report_path}.rank{report['rank']}").write_text(json.dumps(report, indent=1, default=str))


# ---- tests ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(fast_paths_runs):
    """The two runs (conftest.fast_paths_runs, session-scoped: test_vllm_colocate.py reads the fast one too)."""
    return fast_paths_runs


def steps(report: dict) -> list[dict]:
    return [h for h in report[0]["log_history"] if "loss" in h]


@pytest.mark.slow
def test_the_cut_is_on_by_default_and_off_with_the_flag(runs):
    cuts = ("reuse_loss_logps", "layerwise_weight_sync", "dedupe_images")
    assert all(runs["fast"][r][cut] for r in (0, 1) for cut in cuts)
    assert not any(runs["trl"][r][cut] for r in (0, 1) for cut in cuts)


@pytest.mark.slow
def test_no_importance_sampling_forward_is_left(runs):
    """TRL's path: one no-grad forward per generation over the rank's 4 completions; the fast path: none."""
    for r in (0, 1):
        assert runs["trl"][r]["nograd_logps"]["calls"] == STEPS
        assert runs["trl"][r]["nograd_logps"]["sequences"] == STEPS * 4
        assert runs["fast"][r]["nograd_logps"] == {"calls": 0, "sequences": 0, "seconds": 0.0}


@pytest.mark.slow
def test_trl_metrics_and_loss_are_unchanged(runs):
    """Step 1 (the same weights, the same vLLM samples in both runs): every metric of TRL's that the importance-
    sampling ratio feeds, and the loss, equal within REL_TOL. Later steps cannot be compared value for value: on CPU
    the backward pass under ZeRO-3 is not run-to-run deterministic, in TRL's own path too (two runs with identical
    flags: grad_norm 0.1990 and 0.2005 at step 1 with 2 processes, 0.275 and 0.255 with 1; the forward is
    deterministic: loss and log-probs agree to every logged digit), so the weights, and the samples, part after the
    first update. grad_norm is left out for that reason."""
    trl, fast = steps(runs["trl"]), steps(runs["fast"])
    assert len(trl) == len(fast) == STEPS
    a, b = trl[0], fast[0]
    for key in METRICS:
        assert key in a and key in b, key
        assert b[key] == pytest.approx(a[key], rel=REL_TOL, abs=1e-7), (key, a[key], b[key])
    for run in (trl, fast):  # logged at every step, from that step's samples (a stale or constant value fails)
        mins = [h["sampling/importance_sampling_ratio/min"] for h in run]
        assert len(set(mins)) == STEPS and all(0.9 < m < 1.1 for m in mins), mins  # M10's bound (test_vllm_colocate)
        assert all(h["sampling/importance_sampling_ratio/min"] < h["sampling/importance_sampling_ratio/mean"]
                   < h["sampling/importance_sampling_ratio/max"] for h in run)


@pytest.mark.slow
def test_layerwise_sync_hands_vllm_the_same_weights_with_one_block_gathered(runs, tiny_model):
    """At every hand-off the layer-by-layer sync holds at most its largest block, here read from the model file: a
    decoder layer or vision block, or one tensor outside them (for the tiny model the vision merger's 512 x 512
    matrix is the largest); TRL's holds the whole model."""
    import re
    from collections import Counter

    from safetensors import safe_open

    sizes = Counter()
    with safe_open(str(tiny_model / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            block = re.match(r"(.*\.(layers|blocks)\.\d+)\.", name)
            numel = 1
            for dim in f.get_slice(name).get_shape():
                numel *= dim
            sizes[block.group(1) if block else name] += numel
    largest = max(sizes.values())
    for r in (0, 1):
        sync = runs["fast"][r]["sync"]
        assert sync["vllm_params"] > 20 and sync["left_nan"] == []
        assert sync["bitwise_equal"] == sync["vllm_params"], "every vLLM weight equals what TRL's sync loaded"
        peaks = sync["gathered_bytes_at_handoff"]
        # TRL's sync holds every partitioned parameter at once; layer by layer, at most the largest block
        assert peaks["upstream"] == sync["partitioned_bytes"]
        assert peaks["layerwise"] == largest * sync["bytes_per_element"] < peaks["upstream"]


def test_layerwise_sync_leaves_persistent_base_weights_bit_identical():
    """A ZeRO-3 parameter below --zero3_param_persistence_threshold (the tuned configuration keeps q_proj/v_proj so)
    is the trainer's own whole tensor: merging LoRA into it and unmerging, as TRL's sync does, does not give the
    same bf16 weight back (the control below), and the error would add up at every step. The layer-by-layer sync
    restores such weights from a copy. A bf16 toy model with LoRA on `q`, no process group needed (GatheredParameters
    is a no-op on parameters ZeRO does not manage)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from trl.generation.vllm_generation import VLLMGeneration

    from fast_paths import layerwise_sync, sync_blocks

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.o = torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 64)
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

    torch.manual_seed(0)
    model = get_peft_model(Toy().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=["q"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter: B != 0
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    for layer in model.base_model.model.layers:
        layer.q.base_layer.weight.ds_persist = True

    generation = type("Generation", (), {"_fix_param_name_to_vllm": VLLMGeneration._fix_param_name_to_vllm})()
    generation.model = model
    handed = {}
    report = layerwise_sync(generation, lambda name, tensor: handed.__setitem__(name, tensor.clone()))
    assert [len(b) for b in sync_blocks(model)] == [1, 4, 4]  # embed; each layer: q base, lora A, lora B, o
    assert report["tensors"] == len(handed) == 5 and "layers.0.q.weight" in handed  # LoRA tensors are not handed
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name
    merged = base["base_model.model.layers.0.q.base_layer.weight"].float() + 2 * (
        model.base_model.model.layers[0].q.lora_B["default"].weight.float()
        @ model.base_model.model.layers[0].q.lora_A["default"].weight.float())
    assert torch.allclose(handed["layers.0.q.weight"].float(), merged, atol=0.05)
    assert not torch.equal(handed["layers.0.q.weight"], base["base_model.model.layers.0.q.base_layer.weight"])

    # the control: TRL's merge_adapter / unmerge_adapter round trip on the same bf16 weights
    model.merge_adapter()
    model.unmerge_adapter()
    assert not torch.equal(model.base_model.model.layers[0].q.base_layer.weight,
                           base["base_model.model.layers.0.q.base_layer.weight"])


def test_each_distinct_image_is_preprocessed_once_per_rollout_with_the_same_result(processor):
    """F3 on the tiny model's processor, called the two ways TRL's rollout calls it (the chat template with the
    images in the conversation, then the processor on text and images), over 2 distinct images each repeated 4
    times as separate PIL objects (what num_generations gives): the same ids, pixel values and grids, bit for bit,
    with the image processor run on 2 images instead of 16."""
    import torch
    from PIL import Image

    from fast_paths import DedupedImageProcessor

    distinct = [Image.new("RGB", (112, 84), "red"), Image.new("RGB", (56, 56), (10, 200, 30))]
    distinct[0].putpixel((3, 3), (0, 0, 255))  # not a flat colour: pixels, not just size, must match
    images = [[im.copy()] for im in distinct * 4]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": im[0]}, {"type": "text", "text": "How many?"}]}]
                     for im in images]
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)

    def rollout():
        tokenized = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)
        forward = processor(images=images, text=texts, padding=True, return_tensors="pt")
        return tokenized, forward

    upstream = rollout()
    inner = processor.image_processor
    processor.image_processor = deduped = DedupedImageProcessor(inner)
    try:
        fast = rollout()
    finally:
        processor.image_processor = inner
    assert deduped.processed == 2
    assert fast[0]["input_ids"] == upstream[0]["input_ids"]
    for a, b in ((fast[0], upstream[0]), (fast[1], upstream[1])):
        assert torch.equal(torch.as_tensor(a["pixel_values"]), torch.as_tensor(b["pixel_values"]))
        assert torch.equal(torch.as_tensor(a["image_grid_thw"]), torch.as_tensor(b["image_grid_thw"]))
    assert torch.equal(fast[1]["input_ids"], upstream[1]["input_ids"])
    assert upstream[1]["image_grid_thw"].tolist()[:2] == [[1, 6, 8], [1, 4, 4]]  # two sizes: a mix-up would show


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
    gc.freeze()  # as grpo_vlm.py ends: the interpreter's last garbage scan skips what torch and vLLM hold (~2 s)
