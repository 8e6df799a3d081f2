"""Three trainer-side costs of TRL 1.2.0's vLLM colocate path, cut without changing what is computed (issue 11, item 3).

F1  The importance-sampling forward. With `--use_vllm`, TRL's `_generate_and_score_completions` runs one more
    no-grad forward over every completion (`old_per_token_logps`) only to compare the trainer's log-probs with
    vLLM's (`vllm_importance_sampling_correction`, on by default), even when nothing changes the policy between that
    forward and the loss forward: one generation per optimizer step and one iteration over it. TRL itself skips the
    pass in exactly that case without vLLM, and uses the loss forward's detached log-probs instead (the comment
    "When num_iterations == 1 and steps_per_generation <= gradient_accumulation_steps, old_per_token_logps ==
    per_token_logps" in `GRPOTrainer._compute_loss`). `ReuseLossLogps` does the same with vLLM: the rollout skips the
    pass, and the loss forward's log-probs (detached) give the importance-sampling ratio, computed and capped with
    TRL's own formula and logged under TRL's metric names with TRL's reductions (per-rank min/mean/max over the
    generation batch, then across ranks). Where the policy can change between generation and loss (more than one
    optimizer step per generation, `num_iterations` > 1), in evaluation, and with the Liger loss (which never calls
    the per-token log-prob function) TRL's path runs unchanged.
    With `lora_dropout` > 0 (TRL's default 0.05) the two paths differ by dropout noise only: TRL's extra forward draws
    its own dropout mask, so its `old_per_token_logps` are not those of the loss forward; here the policy ratio is
    exactly 1 at the first (only) iteration, which is what the GRPO objective states for on-policy data.
F2  The weight sync. TRL's `VLLMGeneration.sync_weights` under ZeRO-3 with PEFT gathers every parameter of the model
    at once (`GatheredParameters(list(model.parameters()))`) to merge LoRA, load into vLLM and unmerge: a whole bf16
    copy of the model (7 GiB for the 3B) lives next to the ZeRO-3 shards and vLLM's pool. TRL PR #5766 (open)
    proposes gathering layer by layer. `layerwise_sync` gathers one block at a time (a decoder layer, a vision block,
    or one parameter outside any block), merges the LoRA layers inside it, hands its tensors to vLLM under TRL's
    name mapping, unmerges and releases it, so the extra memory is one block (the largest is the embedding, 0.6 GiB
    for the 3B). The tensors vLLM receives are the same, in the same order. One difference on purpose: a weight that
    ZeRO-3 keeps whole on every GPU (below --zero3_param_persistence_threshold, as the tuned configuration keeps
    q_proj and v_proj) is the trainer's own tensor, and TRL's merge + unmerge leaves it changed by bf16 rounding at
    every sync; here it is restored from a copy, bit for bit (tests/test_fast_paths.py shows both).
F3  Image preprocessing, measured as most of what is left of the rollout on the trainer side (BENCHMARKS.md): TRL
    runs the processor twice per rollout (`_tokenize_prompts`, then `_generate_and_score_completions` for the
    forward's pixel values), each time over every prompt's image, and every image comes `num_generations` times (8
    in the seed): 16 runs of the image processor per distinct image. `DedupedImageProcessor` stands in for the
    processor's image processor during a rollout and processes each distinct image (same mode, size and pixels)
    once; the pixel values and grids it returns are the processor's own, in the order asked for.
"""

from __future__ import annotations

import hashlib

import logging
import torch

logger = logging.getLogger(__name__)


# ---- F1: importance-sampling ratio from the loss forward ----------------------------------------------------------


def policy_fixed_between_generation_and_loss(args) -> bool:
    """True when every micro-batch of a generation is scored by the policy that generated it: one iteration, and the
    generation's micro-batches all fall inside one optimizer step (TRL's own test, minus the num_iterations case)."""
    return args.num_iterations == 1 and args.gradient_accumulation_steps % args.steps_per_generation == 0


def importance_sampling_ratio(logps, sampling_logps, mask, mode: str, cap: float) -> torch.Tensor:
    """TRL 1.2.0's vLLM importance-sampling ratio (GRPOTrainer._generate_and_score_completions), from the trainer's
    log-probs `logps` and vLLM's `sampling_logps`, per token (B, T) or per sequence (B, 1)."""
    diff = (logps - sampling_logps) * mask
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, max=cap)
    if mode in ("sequence_mask", "token_mask"):
        return ratio.masked_fill(ratio > cap, value=0.0)
    raise ValueError(f"Unknown vLLM importance sampling mode: {mode}")


class _RankStats:
    """Per-rank min / sum / count / max over the micro-batches of one generation: TRL reduces over the whole
    generation batch of a rank before gathering, so the micro-batches' values are pooled, not averaged."""

    def __init__(self):
        self.min, self.max, self.sum, self.count = float("inf"), float("-inf"), 0.0, 0

    def add(self, values: torch.Tensor) -> None:
        if values.numel():
            v = values.detach().float()
            self.min, self.max = min(self.min, float(v.min())), max(self.max, float(v.max()))
            self.sum, self.count = self.sum + float(v.sum()), self.count + v.numel()

    def tensors(self, device):
        if not self.count:  # TRL logs 0.0 for an empty selection
            zero = torch.tensor(0.0, device=device)
            return zero, zero, zero
        return (torch.tensor(self.min, device=device), torch.tensor(self.sum / self.count, device=device),
                torch.tensor(self.max, device=device))


class ReuseLossLogps:
    """GRPOTrainer mixin (F1); `fast_paths=False` restores TRL's path."""

    def __init__(self, *args, fast_paths: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.reuse_loss_logps = bool(
            fast_paths and self.use_vllm and self.vllm_importance_sampling_correction and not self.use_liger_kernel
            and policy_fixed_between_generation_and_loss(self.args)
        )
        self._loss_inputs = None
        self._is_stats = None
        if fast_paths and self.use_vllm and self.vllm_importance_sampling_correction and not self.reuse_loss_logps:
            logger.info("fast paths: importance-sampling forward kept (the policy can change between generation and "
                        "loss, or the Liger loss is on)")

    def _generate_and_score_completions(self, inputs):
        if not (self.reuse_loss_logps and self.model.training):
            return super()._generate_and_score_completions(inputs)
        # TRL then skips the old-policy forward (aligned steps), the ratio and its metrics; the loss computes them.
        self.vllm_importance_sampling_correction = False
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self.vllm_importance_sampling_correction = True
        self._is_stats = {"delta": _RankStats(), "ratio": _RankStats(), "micro_batches": 0}
        return out

    def _compute_loss(self, model, inputs):
        if self.reuse_loss_logps and self.model.training and "importance_sampling_ratio" not in inputs:
            self._loss_inputs = inputs  # filled by the next log-prob call, the loss forward's own
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        inputs, self._loss_inputs = self._loss_inputs, None
        if inputs is not None:
            self._ratio_from_loss_logps(out[0].detach(), inputs)
        return out

    def _ratio_from_loss_logps(self, logps: torch.Tensor, inputs: dict) -> None:
        sampling = inputs["sampling_per_token_logps"]
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        mode = self.vllm_importance_sampling_mode
        ratio = importance_sampling_ratio(logps, sampling, mask, mode, self.vllm_importance_sampling_cap)
        inputs["importance_sampling_ratio"] = ratio  # read by TRL's _compute_loss right after this forward
        stats = self._is_stats
        bool_mask = mask.bool()
        stats["delta"].add(torch.abs(logps - sampling)[bool_mask])
        stats["ratio"].add(ratio.flatten() if mode.startswith("sequence") else ratio[bool_mask])
        stats["micro_batches"] += 1
        if stats["micro_batches"] == self.args.steps_per_generation:
            self._log_is_metrics(stats)

    def _log_is_metrics(self, stats: dict) -> None:
        """TRL's sampling/* metrics, once per generation, with its reductions across ranks."""
        from trl.trainer.utils import nanmax, nanmin

        gather, device, metrics = self.accelerator.gather, self.accelerator.device, self._metrics["train"]
        _, delta_mean, delta_max = stats["delta"].tensors(device)
        metrics["sampling/sampling_logp_difference/mean"].append(gather(delta_mean).mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(gather(delta_max).max().item())
        lo, mean, hi = stats["ratio"].tensors(device)
        metrics["sampling/importance_sampling_ratio/min"].append(nanmin(gather(lo)).item())
        metrics["sampling/importance_sampling_ratio/mean"].append(gather(mean).nanmean().item())
        metrics["sampling/importance_sampling_ratio/max"].append(nanmax(gather(hi)).item())


# ---- F2: layer-by-layer weight sync into vLLM -----------------------------------------------------------------------


def sync_blocks(model) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """model.named_parameters(), in order, grouped by the block that holds them: the outermost ModuleList element
    (a decoder layer, a vision block) that contains the parameter, else the LoRA-wrapped module that does (its
    base weight and adapters must be whole together to merge), else the parameter alone."""
    from peft.tuners.lora import LoraLayer

    block_prefixes = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            block_prefixes.update(f"{name}.{child}." for child, _ in module.named_children())
        elif isinstance(module, LoraLayer):
            block_prefixes.add(f"{name}.")
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        prefixes = [p for p in block_prefixes if name.startswith(p)]
        key = min(prefixes, key=len) if prefixes else name  # the outermost block: a layer, not a LoRA module in it
        groups.setdefault(key, []).append((name, param))
    return list(groups.values())


def vllm_name(generation, peft_model, name: str) -> str | None:
    """TRL 1.2.0's name mapping for ZeRO-3 + PEFT (VLLMGeneration.sync_weights); None for what vLLM does not get."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if peft_model.prefix in name or "original_module" in name:
        return None
    return generation._fix_param_name_to_vllm(name, extra_prefixes=["modules_to_save.default."])


def layerwise_sync(generation, load, blocks=None) -> dict:
    """Sync a PEFT model under ZeRO-3 into vLLM one block at a time (F2). `load(name, tensor)` hands one tensor to
    vLLM; `blocks`: sync_blocks(model), computed once by the caller. Returns the largest block's bytes (the sync's
    extra memory) and the number of tensors handed over."""
    import deepspeed

    model = generation.model
    biggest, handed = 0, 0
    for block in blocks if blocks is not None else sync_blocks(model):
        params = [p for _, p in block]
        biggest = max(biggest, sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params))
        with deepspeed.zero.GatheredParameters(params):
            # dict, not set: merge and unmerge in the same, deterministic order
            lora = {m: None for n, _ in block if (m := _lora_ancestor(model, n)) is not None}
            # A gathered ZeRO-3 weight is dropped on exit, the shard is untouched; a persistent one (fewer elements
            # than --zero3_param_persistence_threshold) is the trainer's own tensor, and unmerge(merge(W)) != W in
            # bf16. Those are restored from a copy, exactly.
            kept = {m: m.base_layer.weight.detach().clone() for m in lora
                    if getattr(m.base_layer.weight, "ds_persist", False)}
            for module in lora:
                module.merge()
            try:
                for name, param in block:
                    target = vllm_name(generation, model, name)
                    if target is not None:
                        load(target, param.data)
                        handed += 1
            finally:
                for module in lora:
                    module.unmerge()
                for module, weight in kept.items():
                    module.base_layer.weight.data.copy_(weight)
    return {"largest_block_bytes": biggest, "tensors": handed}


def _lora_ancestor(model, param_name: str):
    """The innermost LoRA-wrapped module on the parameter's path, or None."""
    from peft.tuners.lora import LoraLayer

    found, module = None, model
    for part in param_name.split(".")[:-1]:
        module = getattr(module, part)
        if isinstance(module, LoraLayer):
            found = module
    return found


def install_layerwise_sync(generation, accelerator) -> bool:
    """Replace TRL's sync_weights on this VLLMGeneration with the layer-by-layer one, where it applies: colocate
    mode, DeepSpeed ZeRO-3, a PEFT model (TRL's whole-model gather exists for that case). Returns whether it did."""
    from peft import PeftModel

    plugin = accelerator.state.deepspeed_plugin
    if generation.mode != "colocate" or plugin is None or plugin.zero_stage != 3 or not isinstance(generation.model,
                                                                                                   PeftModel):
        return False
    upstream = generation.sync_weights
    blocks = []  # the grouping depends only on the module tree: computed at the first sync

    def sync_weights():
        if generation.enable_sleep_mode:  # refused by grpo_vlm.py (trl#5312); keep TRL's own path if it ever runs
            return upstream()
        if not blocks:
            blocks.extend(sync_blocks(generation.model))
        llm_model = generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
        report = layerwise_sync(generation, lambda name, tensor: llm_model.load_weights([(name, tensor)]), blocks)
        generation.llm.reset_prefix_cache()
        return report

    sync_weights.upstream = upstream
    generation.sync_weights = sync_weights
    return True


# ---- F3: each distinct image preprocessed once per rollout ------------------------------------------------------------


def _flat_images(images) -> list | None:
    """The images in the order the image processor flattens them (a list of per-prompt lists, or a flat list);
    None for anything else (then the processor runs as usual)."""
    if not isinstance(images, (list, tuple)):
        return None
    flat = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat if flat and all(hasattr(im, "tobytes") and hasattr(im, "mode") for im in flat) else None


class DedupedImageProcessor:
    """The processor's image processor, with each distinct PIL image (mode, size, pixels) processed once for as long
    as this object lives (one rollout); everything else is delegated."""

    def __init__(self, inner):
        self._inner = inner
        self._done: dict[bytes, tuple] = {}  # image key -> (its pixel rows, its grid row)
        self.processed = 0  # images the inner processor saw

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @staticmethod
    def _key(image) -> bytes:
        return hashlib.blake2b(f"{image.mode}{image.size}".encode() + image.tobytes(), digest_size=16).digest()

    def __call__(self, images=None, **kwargs):
        flat = _flat_images(images)
        if flat is None:
            return self._inner(images=images, **kwargs)
        keys = [self._key(im) for im in flat]
        todo = {k: im for k, im in zip(keys, flat) if k not in self._done}
        if todo:
            out = self._inner(images=list(todo.values()), **kwargs)
            if set(out.keys()) != {"pixel_values", "image_grid_thw"} or not isinstance(out["pixel_values"], torch.Tensor):
                return self._inner(images=images, **kwargs)  # a processor this was not written for: no shortcut
            self.processed += len(todo)
            rows = out["image_grid_thw"].prod(dim=-1).tolist()
            pixels = out["pixel_values"].split(rows)
            for i, k in enumerate(todo):
                self._done[k] = (pixels[i], out["image_grid_thw"][i])
        from transformers.feature_extraction_utils import BatchFeature

        return BatchFeature({"pixel_values": torch.cat([self._done[k][0] for k in keys]),
                             "image_grid_thw": torch.stack([self._done[k][1] for k in keys])})


class FastPaths(ReuseLossLogps):
    """GRPOTrainer mixin: F1, F2 and F3 behind one switch, `fast_paths` (grpo_vlm.py `--vllm_fast_paths`)."""

    def __init__(self, *args, fast_paths: bool = True, **kwargs):
        super().__init__(*args, fast_paths=fast_paths, **kwargs)
        self.layerwise_weight_sync = bool(fast_paths and self.use_vllm
                                   and install_layerwise_sync(self.vllm_generation, self.accelerator))
        self.dedupe_images = bool(fast_paths and self.use_vllm
                                  and getattr(self.processing_class, "image_processor", None) is not None)
        if self.reuse_loss_logps or self.layerwise_weight_sync:
            logger.info("vLLM fast paths: importance-sampling ratio from the loss forward %s, layer-by-layer weight "
                        "sync %s, each distinct image preprocessed once per rollout %s",
                        *("on" if x else "off" for x in (self.reuse_loss_logps, self.layerwise_weight_sync,
                                                         self.dedupe_images)))

    def _generate_and_score_completions(self, inputs):
        if not self.dedupe_images:
            return super()._generate_and_score_completions(inputs)
        processor = self.processing_class
        inner = processor.image_processor
        processor.image_processor = DedupedImageProcessor(inner)  # for this rollout only: saving sees the original
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            processor.image_processor = inner
