"""One GRPO step of grpo_vlm.py's own trainer on a fixed batch; writes the LoRA gradients it computed.

    # 2 ZeRO-3 processes (the recipe's accelerate config), gradient checkpointing on:
    accelerate launch --config_file code/vlm-grpo/deepspeed_zero3.yaml tests/zero3_grad_check.py GRADS.safetensors \\
        <grpo_vlm.py arguments, --gradient_checkpointing included>
    # the reference: one process, no DeepSpeed, no checkpointing
    python tests/zero3_grad_check.py GRADS.safetensors <the same arguments with --gradient_checkpointing false>

The trainer, its loss and its backward are the recipe's (grpo_vlm.setup, build_trainer, Trainer.train); only the
rollout is replaced: `_prepare_inputs` returns a batch fixed here (prompts of the dataset's first rows with their
images, fixed completion texts, fixed advantages), and the LoRA weights are set to fixed values (B non-zero, so lora_A
gets a gradient too) before training starts. The batch is built whole on every process and each process takes its own
rows, so the processes of a ZeRO-3 run together see exactly the rows of the single-process run.

The gradients are read right before the optimizer step: under ZeRO-3 inside DeepSpeed's `engine.step()` (accelerate
calls it at the end of `backward`; the reduced gradient partitions are gathered with deepspeed's safe_get_full_grad,
a collective, so every rank reads them), otherwise at the `on_pre_optimizer_step` callback. Pass `--max_grad_norm 0`:
the single-process Trainer clips before that callback, DeepSpeed only inside step.

Rank 0 writes GRADS.safetensors: one float32 tensor per LoRA parameter, and in the metadata (key "report", JSON) the
world size, the distributed type, the checkpointing kwargs in force and the batch's row count.
"""

from __future__ import annotations

import gc
import json
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code" / "vlm-grpo"))

import grpo_vlm  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from zero3 import checkpointing_kwargs_in_use  # noqa: E402

# Completions of the shape the rewards expect, of different lengths (the shorter ones end in padding, masked out).
COMPLETIONS = [
    "<think> I count the shapes one by one. </think> <answer> 3 </answer>",
    "<think> the sum of the digits shown </think> <answer> 12 </answer>",
    "<answer> 7 </answer>",
    "<think> red circles are in the image, blue squares are not </think> <answer> 5 </answer>",
]
# One advantage per completion, both signs, different sizes: a gradient scaled or summed wrongly shows.
ADVANTAGES = [1.0, -0.5, 0.25, -1.25]


def fixed_lora_value(name: str, shape) -> torch.Tensor:
    """The same value for a parameter in every process and every run: seeded by its name."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(tuple(shape), generator=generator) * 0.05


def set_fixed_lora_weights(model) -> None:
    import deepspeed

    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        # Partitioned (ZeRO-3) or not, write the whole tensor; GatheredParameters is a no-op for a plain tensor.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.copy_(fixed_lora_value(name, getattr(param, "ds_shape", param.shape)).to(param.dtype))


def fixed_batch(trainer, dataset) -> dict:
    """All rows' GRPO inputs, in the form TRL's _generate_and_score_completions hands to compute_loss."""
    from trl.data_utils import prepare_multimodal_messages
    from trl.trainer.utils import pad

    rows = [dataset[i] for i in range(len(COMPLETIONS))]
    prompts = [prepare_multimodal_messages(row["prompt"], images=[row["image"]]) for row in rows]
    prompt_ids, _, multimodal = trainer._tokenize_prompts(prompts)
    tokenizer = trainer.processing_class.tokenizer
    completion_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                      for text in COMPLETIONS]

    def padded(seqs, side):
        ids = pad([torch.tensor(s) for s in seqs], padding_value=trainer.pad_token_id, padding_side=side)
        mask = pad([torch.ones(len(s), dtype=torch.long) for s in seqs], padding_value=0, padding_side=side)
        return ids, mask

    prompt_ids, prompt_mask = padded(prompt_ids, "left")
    completion_ids, completion_mask = padded(completion_ids, "right")
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(ADVANTAGES),
        # the whole batch's completion tokens, as TRL gathers them across processes (the DAPO loss divides by it)
        "num_items_in_batch": completion_mask.sum(),
        "pixel_values": torch.as_tensor(multimodal["pixel_values"]),
        "image_grid_thw": torch.as_tensor(multimodal["image_grid_thw"]),
        "num_images": [1] * len(rows),
    }


def rows_of_process(batch: dict, rank: int, world: int) -> dict:
    """This process's share of the rows; pixel rows follow their images (one image per row)."""
    n = len(batch["advantages"])
    assert n % world == 0, f"{n} rows do not split over {world} processes"
    lo, hi = rank * n // world, (rank + 1) * n // world
    pixel_rows = torch.cat([torch.zeros(1, dtype=torch.long), batch["image_grid_thw"].prod(-1).cumsum(0)])
    local = {k: v[lo:hi] for k, v in batch.items() if k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                              "completion_mask", "advantages", "image_grid_thw")}
    local["pixel_values"] = batch["pixel_values"][pixel_rows[lo] : pixel_rows[hi]]
    local["num_images"] = batch["num_images"][lo:hi]
    local["num_items_in_batch"] = batch["num_items_in_batch"]
    return local


class GradRecorder(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.grads: dict[str, torch.Tensor] = {}
        self.checkpointing_kwargs = None

    def record(self, model, read) -> None:
        if self.grads:  # one step only
            return
        self.checkpointing_kwargs = checkpointing_kwargs_in_use(model)
        for name, param in model.named_parameters():
            if param.requires_grad:
                grad = read(param)
                self.grads[name] = torch.zeros(param.shape) if grad is None else grad.detach().float().cpu().clone()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        wrapper = getattr(self.trainer.accelerator, "deepspeed_engine_wrapped", None)
        if wrapper is None:
            return
        from deepspeed.utils import safe_get_full_grad

        engine, step = wrapper.engine, wrapper.engine.step

        def step_after_reading_grads(*a, **kw):
            self.record(engine.module, safe_get_full_grad)
            return step(*a, **kw)

        engine.step = step_after_reading_grads

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if getattr(self.trainer.accelerator, "deepspeed_engine_wrapped", None) is None:
            self.record(model, lambda p: p.grad)


def main() -> None:
    out_path, argv = Path(sys.argv[1]), sys.argv[2:]
    script_args, training_args, model_args = grpo_vlm.parse_args(argv)
    processor = grpo_vlm.setup(script_args, training_args, model_args)
    train_dataset, _, _ = grpo_vlm.load_datasets(script_args, training_args, processor)
    trainer = grpo_vlm.build_trainer(script_args, training_args, model_args, processor, train_dataset, None)
    recorder = GradRecorder(trainer)
    trainer.add_callback(recorder)
    set_fixed_lora_weights(trainer.model)

    acc = trainer.accelerator
    batch = rows_of_process(fixed_batch(trainer, train_dataset), acc.process_index, acc.num_processes)
    trainer._prepare_inputs = lambda generation_batch: {  # the rollout, replaced by the fixed batch
        k: v.to(acc.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }
    trainer.train()

    if not acc.is_main_process:
        return
    from safetensors.torch import save_file

    report = {
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "checkpointing_kwargs": recorder.checkpointing_kwargs,
        "rows": len(ADVANTAGES),
    }
    save_file({k: v.contiguous() for k, v in recorder.grads.items()}, str(out_path),
              metadata={"report": json.dumps(report, default=str)})


if __name__ == "__main__":
    main()
    gc.freeze()  # as grpo_vlm.py ends: the interpreter's last garbage scan skips what torch and vLLM hold (~2 s)
