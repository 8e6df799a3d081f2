"""Run grpo_vlm.py's own stages under `accelerate launch` and record which weights training changed.

    accelerate launch --config_file code/vlm-grpo/deepspeed_zero3.yaml tests/zero3_weight_check.py REPORT.json \\
        <grpo_vlm.py arguments>

Rank 0 writes REPORT.json: for every LoRA tensor whether it differs from its value at the start of training, for
every base tensor whether it differs from the model file on disk, the LR scheduler's group count against the
optimizer's (fix ledger M4), and the checkpointing kwargs in force at the end (M1'). Parameters are gathered across
ZeRO-3 ranks first, so the comparison sees whole tensors, not shards.

With `--use_vllm` it also syncs the trained policy into the colocated vLLM engine the way the next rollout would
(TRL's sync_weights: gather, merge LoRA, load into vLLM, unmerge) and records, for every layer, how far the q, k and
v slices of vLLM's fused qkv_proj are from base + scale * B @ A computed here from the model file and the trainer's
LoRA tensors, and whether the trainer's own base weights survived the merge/unmerge round trip.
"""

from __future__ import annotations

import gc
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


def base_name(peft_name: str, on_disk: dict | None = None) -> str:
    """PEFT parameter name -> name in the model file: the model's own name where the file has it (Qwen3-VL saves
    `model.language_model.*` / `model.visual.*`), else Qwen2/2.5-VL's legacy layout, `model.layers.*` / `visual.*`,
    which transformers 4.57 loads into those names."""
    name = peft_name.replace("base_model.model.", "", 1).replace(".base_layer", "")
    if on_disk is not None and name in on_disk:
        return name
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


def vllm_sync_report(trainer, on_disk: dict[str, torch.Tensor]) -> dict:
    """Sync the policy into vLLM (every rank: the gather is collective), then compare vLLM's weights with base +
    merged LoRA computed independently here, in float32. Every rank checks its own engine; rank 0's is reported."""
    trainer.vllm_generation.sync_weights()
    after = gathered_state(trainer.model)
    vllm_model = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    vllm_params = {n: p.detach().float() for n, p in vllm_model.named_parameters()}
    text = trainer.model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads  # Qwen3-VL states it
    q_size, kv_size = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    lora = trainer.model.peft_config["default"]
    scale = lora.lora_alpha / lora.r
    layers = []
    for i in range(text.num_hidden_layers):
        qkv = vllm_params[f"language_model.model.layers.{i}.self_attn.qkv_proj.weight"]
        got = {"q": qkv[:q_size], "k": qkv[q_size : q_size + kv_size], "v": qkv[q_size + kv_size :]}
        entry = {}
        for proj in ("q", "k", "v"):
            base = on_disk[base_name(f"model.language_model.layers.{i}.self_attn.{proj}_proj.weight", on_disk)].float()
            prefix = f"base_model.model.model.language_model.layers.{i}.self_attn.{proj}_proj"
            delta = torch.zeros_like(base)
            if f"{prefix}.lora_A.default.weight" in after:
                a, b = after[f"{prefix}.lora_A.default.weight"].float(), after[f"{prefix}.lora_B.default.weight"].float()
                delta = scale * b @ a
            entry[proj] = {
                "max_abs_delta": float(delta.abs().max()),
                "max_abs_err_vs_merged": float((got[proj] - (base + delta)).abs().max()),
                "max_abs_diff_vs_base": float((got[proj] - base).abs().max()),
                "base_bf16_ulp": float(base.abs().max() * 2**-8),
            }
        layers.append(entry)
    base_changed = [
        n for n, t in after.items()
        if "lora_" not in n and (k := base_name(n, on_disk)) in on_disk and not torch.equal(t.to(on_disk[k].dtype), on_disk[k])
    ]
    return {"layers": layers, "trainer_base_changed_after_sync": base_changed, "lora_scale": scale}


def record_engine_prompts(path: Path) -> None:
    """Every prompt the M8 check compares (the trainer's ids, the ids vLLM reports it ran) goes to `path` as this rank's
    JSON list, so a test reads what vLLM saw for each image size."""
    import vllm_colocate

    check = vllm_colocate.check_engine_prompts
    seen = []

    def recording_check(trainer_ids, engine_ids):
        seen.extend({"trainer": list(map(int, t)), "engine": list(map(int, e))} for t, e in zip(trainer_ids, engine_ids))
        path.write_text(json.dumps(seen))
        return check(trainer_ids, engine_ids)

    vllm_colocate.check_engine_prompts = recording_check  # align_prompts_with_vllm looks it up at each rollout


def weights_report(trainer, recorder: WeightRecorder, model_args, training_args, adapter=None) -> dict | None:
    """What training changed and, with `--use_vllm`, what vLLM holds after a sync (run on every rank: the gathers are
    collective); the report on rank 0, None elsewhere. Also called by tests/test_fast_paths.py's worker, whose
    fast-paths run is the vLLM weight check of tests/test_vllm_colocate.py (one launch for both)."""
    from safetensors.torch import load_file

    on_disk = load_file(str(Path(model_args.model_name_or_path) / "model.safetensors"))
    vllm_sync = vllm_sync_report(trainer, on_disk) if training_args.use_vllm else None
    if not trainer.accelerator.is_main_process:
        return None
    lora = {n: not torch.equal(recorder.start[n], recorder.end[n]) for n in recorder.end if "lora_" in n}
    base = {}
    for name, tensor in recorder.end.items():
        if "lora_" in name:
            continue
        key = base_name(name, on_disk)
        if key == "lm_head.weight" and key not in on_disk:  # tied to the embeddings, not stored
            key = base_name("model.language_model.embed_tokens.weight", on_disk)
        base[key] = not torch.equal(tensor.to(on_disk[key].dtype), on_disk[key]) if key in on_disk else None
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {
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
        "vllm_sync": vllm_sync,
    }


def main() -> None:
    report_path, argv = Path(sys.argv[1]), sys.argv[2:]
    script_args, training_args, model_args = grpo_vlm.parse_args(argv)
    if training_args.use_vllm:
        import os

        record_engine_prompts(report_path.with_name(f"{report_path.stem}-prompts-rank{os.environ.get('RANK', '0')}.json"))
    processor = grpo_vlm.setup(script_args, training_args, model_args)
    recorder = WeightRecorder()
    trainer = grpo_vlm.train(script_args, training_args, model_args, processor, callbacks=[recorder])
    adapter = grpo_vlm.save_outputs(trainer, processor, training_args.output_dir)
    report = weights_report(trainer, recorder, model_args, training_args, adapter)
    if report is not None:
        report_path.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
    gc.freeze()  # as grpo_vlm.py ends: the interpreter's last garbage scan skips what torch and vLLM hold (~2 s)
