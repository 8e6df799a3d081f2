"""Run grpo_vlm.py's own stages under `accelerate launch` and record which weights training changed.

    accelerate launch --config_file code/vlm-grpo/deepspeed_zero3.yaml tests/zero3_weight_check.py REPORT.json \\
        <grpo_vlm.py arguments>

Rank 0 writes REPORT.json: for every LoRA tensor whether it differs from its value at the start of training, for
every base tensor whether it differs from the model file on disk, the LR scheduler's group count against the
optimizer's (KNOWN_ISSUES M4), and the checkpointing kwargs in force at the end (M1'). Parameters are gathered across
ZeRO-3 ranks first, so the comparison sees whole tensors, not shards.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code" / "vlm-grpo"))

import grpo_vlm  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from zero3 import checkpointing_kwargs_in_use  # noqa: E402


def gathered_state(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of every parameter, on CPU; a no-op gather outside ZeRO-3."""
    params = dict(model.named_parameters())
    try:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(params.values()))
    except ImportError:  # pragma: no cover - deepspeed is a pinned requirement
        from contextlib import nullcontext

        ctx = nullcontext()
    with ctx:
        return {name: p.detach().to("cpu", copy=True) for name, p in params.items()}


def base_name(peft_name: str) -> str:
    """PEFT parameter name -> name in the model file (transformers 4.57 loads Qwen2.5-VL's legacy layout,
    `model.layers.*` / `visual.*`, into `model.language_model.*` / `model.visual.*`)."""
    name = peft_name.replace("base_model.model.", "", 1).replace(".base_layer", "")
    return re.sub(r"^model\.visual\.", "visual.", re.sub(r"^model\.language_model\.", "model.", name))


class WeightRecorder(TrainerCallback):
    def __init__(self):
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}
        self.checkpointing_kwargs = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = gathered_state(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end = gathered_state(model)
        self.checkpointing_kwargs = checkpointing_kwargs_in_use(model)


def main() -> None:
    report_path, argv = Path(sys.argv[1]), sys.argv[2:]
    script_args, training_args, model_args = grpo_vlm.parse_args(argv)
    processor = grpo_vlm.setup(script_args, training_args, model_args)
    recorder = WeightRecorder()
    trainer = grpo_vlm.train(script_args, training_args, model_args, processor, callbacks=[recorder])
    adapter = grpo_vlm.save_outputs(trainer, processor, training_args.output_dir)
    if not trainer.accelerator.is_main_process:
        return

    from safetensors.torch import load_file

    on_disk = load_file(str(Path(model_args.model_name_or_path) / "model.safetensors"))
    lora = {n: not torch.equal(recorder.start[n], recorder.end[n]) for n in recorder.end if "lora_" in n}
    base = {}
    for name, tensor in recorder.end.items():
        if "lora_" in name:
            continue
        key = base_name(name)
        if key == "lm_head.weight" and key not in on_disk:  # tied to the embeddings, not stored
            key = "model.embed_tokens.weight"
        base[key] = not torch.equal(tensor.to(on_disk[key].dtype), on_disk[key]) if key in on_disk else None
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    report = {
        "lora_changed": lora,
        "base_changed": base,
        "lora_nonzero_B": {n: bool(t.abs().sum() > 0) for n, t in recorder.end.items() if "lora_B" in n},
        "trainable": sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad),
        "optimizer_groups": len(inner.param_groups),
        "scheduler_base_lrs": len(trainer.lr_scheduler.base_lrs) if hasattr(trainer.lr_scheduler, "base_lrs") else None,
        "checkpointing_kwargs_at_end": recorder.checkpointing_kwargs,
        "global_step": trainer.state.global_step,
        "zero_optimization": trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization"),
        "persistent_params": sorted(n for n, p in trainer.model.named_parameters() if getattr(p, "ds_persist", False)),
        "log_history": trainer.state.log_history,
        "adapter": str(adapter),
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
    }
    report_path.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
