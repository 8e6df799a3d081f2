"""Will the run fit on the GPUs? A per-GPU memory estimate made before any weights load (`--dry_run`, issue 20).

The estimate adds what one GPU holds through a training step, from the model's config.json (read with AutoConfig,
the parameters counted on PyTorch's meta device: no weights, no memory) and the run's flags:

  ZeRO-3 shards of the base    every parameter in bf16, split over the processes
  ZeRO-3 persistent parameters tensors smaller than --zero3_param_persistence_threshold stay whole on every GPU
  ZeRO-3 gathered layers       parameters gathered for the layer at work, prefetched or kept for reuse: bounded by
                               DeepSpeed's stage3_max_live_parameters (1e9 elements), or one decoder layer + the
                               largest tensor (the embedding / output head) when that is more
  LoRA + optimizer             the adapter's bf16 weights, fp32 master copy, fp32 gradient and two Adam moments,
                               split over the processes (18 bytes a parameter)
  activations                  with gradient checkpointing: each decoder layer's input, micro-batch x tokens x
                               hidden x bf16; without it, every layer's saved tensors (~8 hidden + 4 MLP widths)
  logits of the loss batch     micro-batch x completion tokens x vocabulary x fp32 x 2, i.e. four bf16 copies: TRL's
                               loss forward keeps the log-softmax of each row (selective_log_softmax on bf16
                               logits), and the backward adds three more of that size (bench call 5: 6.96 GiB above
                               its start per 8 sequences of 1,024 completion tokens, 2.32 GiB a copy)
  vision tower activations     the micro-batch's image patches x (8 vision widths + 3 MLP widths) x bf16: the frozen
                               tower saves nothing for backward, this is its working set while it runs
  generation (transformers)    without vLLM TRL gathers the whole model on every GPU to generate (ZeRO-3's
                               ds3_gather_for_generation), plus the KV cache of the generation batch
  vLLM pool                    --vllm_gpu_memory_utilization x the card, with --use_vllm --vllm_mode colocate
  CUDA context and NCCL        2.2 GiB (nvidia-smi's peak minus torch's reserved: 2.05-2.16 GiB in the bench runs)

The vision tower, the loss (activations + logits) and transformers generation peak at different moments of a
step, so the estimate counts the largest of the three; the rest is held throughout. Calibrated against every
measured peak in experiments/vlm-grpo/bench-results/ (scripts/fit_report.py --calibration writes
fit-calibration.json; BENCHMARKS.md "The fit check against every measured peak" has the table and how far to trust
it). What it leaves out: the
allocator's cache above the allocated peak (5.8-15.3 GiB in the bench runs; PyTorch frees it before it runs out,
but fragmentation can still fail a run: hence the warning within 10 % of the card),
and vLLM's own activation reserve beyond a flat 2 GiB, which is not measured on GPUs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, replace

from config_error import ConfigError

logger = logging.getLogger(__name__)

GIB = 2**30
BF16 = 2
FP32 = 4
MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's stage3_max_live_parameters default (accelerate leaves it)
LORA_BYTES_PER_PARAMETER = 18  # bf16 weight 2 + fp32 master 4 + fp32 gradient 4 + Adam moments 8
CUDA_CONTEXT_GIB = 2.2  # nvidia-smi's peak minus torch's reserved peak: 2.05-2.16 GiB a GPU in bench calls 1-5
VLLM_RESERVE_GIB = 2.0  # vLLM's activation profile and CUDA graphs beside weights and KV cache: assumed, not measured
WARN_FRACTION = 0.9  # warn when the estimate is within 10 % of the card
CARDS_GB = (80, 141)  # H100 80 GB, H200 141 GB: the dry run prints both

# Term names, as the dry run and the refusal print them.
SHARDS = "ZeRO-3 shards of the base"
PERSISTENT = "ZeRO-3 persistent parameters"
GATHERED = "ZeRO-3 gathered layers"
LORA = "LoRA + optimizer state"
ACTIVATIONS = "activations (gradient checkpointing)"
ACTIVATIONS_FULL = "activations (no gradient checkpointing)"
LOGITS = "logits of the loss micro-batch"
VISION = "vision tower activations"
GENERATION = "transformers generation (whole model gathered + KV cache)"
VLLM_POOL = "vLLM's pool"
CONTEXT = "CUDA context and NCCL"


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs to know about a model, all read from its config (`model_facts`)."""

    name: str
    parameters: int  # all of them, vision tower included; a tied head counted once
    persistent_parameters: int  # elements in tensors under the ZeRO-3 persistence threshold
    gathered_parameters: int  # ZeRO-3's working set, elements
    lora_parameters: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    kv_bytes_per_token: int  # bf16 K and V of every decoder layer
    vision_hidden_size: int
    vision_intermediate_size: int
    patches_per_token: int  # spatial_merge_size^2: image patches merged into one LLM token
    tied_head: bool


@dataclass(frozen=True)
class RunShape:
    """The run's flags, as far as memory goes."""

    processes: int
    gpu_memory_gib: float  # --gpu_memory_gb taken as GiB: an "80 GB" H100 reports 79.6 GiB, 0.4 % less
    micro_batch: int  # --per_device_train_batch_size: completions in one loss forward
    prompt_tokens: int  # the longest prompt (image tokens included): TRL pads a micro-batch to it
    completion_tokens: int  # --max_completion_length
    image_tokens: int  # LLM tokens of one sequence's images
    generation_batch: int  # completions generated per GPU at once
    gradient_checkpointing: bool = True
    generation: str = "vllm-colocate"  # or "vllm-server", "transformers"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1
    gradient_accumulation_steps: int = 1  # only carried so that suggestions keep the batch


@dataclass
class Estimate:
    facts: ModelFacts
    run: RunShape
    terms: dict[str, float]  # GiB; the three phase terms are all listed, only the largest counts in the total
    phase: str  # the phase term that counts
    total_gib: float
    vllm_weights_gib: float = 0.0  # what vLLM's pool must hold to start: weights per GPU, reserve, one sequence's KV

    @property
    def counted(self) -> dict[str, float]:
        phases = {VISION, LOGITS, ACTIVATIONS, ACTIVATIONS_FULL, GENERATION}
        loss = {LOGITS, ACTIVATIONS, ACTIVATIONS_FULL}
        keep = loss if self.phase == "loss" else {VISION if self.phase == "vision" else GENERATION}
        return {k: v for k, v in self.terms.items() if k not in phases or k in keep}

    @property
    def largest(self) -> tuple[str, float]:
        return max(self.counted.items(), key=lambda kv: kv[1])

    @property
    def trainer_gib(self) -> float:
        """The trainer's allocated peak: what torch.cuda.max_memory_allocated measures (no pool, no context)."""
        return self.total_gib - self.terms.get(VLLM_POOL, 0.0) - self.terms[CONTEXT]

    @property
    def pool_too_small(self) -> bool:
        return self.run.generation == "vllm-colocate" and self.vllm_weights_gib > self.terms[VLLM_POOL]

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.run.gpu_memory_gib and not self.pool_too_small

    @property
    def tight(self) -> bool:
        return self.fits and self.total_gib > WARN_FRACTION * self.run.gpu_memory_gib


# ---- the arithmetic ----------------------------------------------------------------------------------------------


def estimate(facts: ModelFacts, run: RunShape) -> Estimate:
    """Per-GPU memory of one training step, in GiB (2^30 bytes), term by term."""
    w = run.processes
    b = run.micro_batch
    tokens = run.prompt_tokens + run.completion_tokens
    terms = {
        SHARDS: facts.parameters * BF16 / w / GIB,
        PERSISTENT: facts.persistent_parameters * BF16 * (1 - 1 / w) / GIB,
        GATHERED: facts.gathered_parameters * BF16 / GIB,
        LORA: facts.lora_parameters * LORA_BYTES_PER_PARAMETER / w / GIB,
    }
    if run.gradient_checkpointing:
        terms[ACTIVATIONS] = b * tokens * facts.hidden_size * BF16 * facts.num_layers / GIB
    else:
        per_token = 8 * facts.hidden_size + 4 * facts.intermediate_size
        terms[ACTIVATIONS_FULL] = b * tokens * per_token * BF16 * facts.num_layers / GIB
    terms[LOGITS] = 2 * b * run.completion_tokens * facts.vocab_size * FP32 / GIB
    patches = b * run.image_tokens * facts.patches_per_token
    terms[VISION] = patches * (8 * facts.vision_hidden_size + 3 * facts.vision_intermediate_size) * BF16 / GIB
    if run.generation == "transformers":
        kv = run.generation_batch * tokens * facts.kv_bytes_per_token
        terms[GENERATION] = (facts.parameters * BF16 + kv) / GIB
    vllm_weights = 0.0
    if run.generation == "vllm-colocate":
        terms[VLLM_POOL] = run.vllm_gpu_memory_utilization * run.gpu_memory_gib
        # vLLM refuses to start when its pool cannot hold the weights, its reserve and one longest sequence's KV cache
        weights = facts.parameters * BF16 / run.vllm_tensor_parallel_size
        vllm_weights = (weights + tokens * facts.kv_bytes_per_token) / GIB
        vllm_weights += VLLM_RESERVE_GIB
    terms[CONTEXT] = CUDA_CONTEXT_GIB
    phases = {"loss": sum(v for k, v in terms.items() if k in (LOGITS, ACTIVATIONS, ACTIVATIONS_FULL)),
              "vision": terms[VISION], "generation": terms.get(GENERATION, 0.0)}
    phase = max(phases, key=phases.get)
    held = sum(v for k, v in terms.items() if k not in (LOGITS, ACTIVATIONS, ACTIVATIONS_FULL, VISION, GENERATION))
    return Estimate(facts, run, terms, phase, held + phases[phase], vllm_weights)


def vllm_utilization_needed(facts: ModelFacts, run: RunShape, tensor_parallel: int) -> float:
    """The smallest --vllm_gpu_memory_utilization (in steps of 0.05) whose pool holds the weights per GPU, the reserve
    and the KV cache of the whole generation batch."""
    tokens = run.prompt_tokens + run.completion_tokens
    need = (facts.parameters * BF16 / tensor_parallel + run.generation_batch * tokens * facts.kv_bytes_per_token) / GIB
    need += VLLM_RESERVE_GIB
    return math.ceil(20 * need / run.gpu_memory_gib - 1e-9) / 20


def make_it_fit(facts: ModelFacts, run: RunShape, max_processes: int = 8) -> dict | None:
    """The smallest change that fits (`_candidates`' order: fewest GPUs, then the largest micro-batch, then the lowest
    vLLM tensor parallelism; the completions per optimizer step kept); a change that leaves 10 % of the card free is
    preferred to one that does not. {} when the run fits as it is; None when nothing up to
    `max_processes` GPUs does."""
    if estimate(facts, run).fits:
        return {}
    tight = None
    for candidate in _candidates(facts, run, max_processes):
        est = estimate(facts, candidate)
        if est.fits and not est.tight:
            return _changes(run, candidate)
        if est.fits and tight is None:
            tight = candidate
    return _changes(run, tight) if tight else None


def _candidates(facts: ModelFacts, run: RunShape, max_processes: int):
    """Runs to try, in order of preference: fewest GPUs, then the largest micro-batch, then the lowest vLLM tensor
    parallelism, with --vllm_gpu_memory_utilization raised where its pool cannot hold the weights and KV cache."""
    colocate = run.generation == "vllm-colocate"
    completions = run.micro_batch * run.processes * run.gradient_accumulation_steps  # per optimizer step, kept
    procs = run.processes
    while procs <= max_processes:
        # TRL generates one optimizer step's completions at once (steps_per_generation = accumulation)
        generation = max(1, run.generation_batch * run.processes // procs)
        mb = max(1, min(run.micro_batch, completions // procs))  # more GPUs: fewer completions each
        while mb >= 1:
            accumulate = max(1, completions // (mb * procs))
            for tp in [t for t in (1, 2, 4, 8) if t <= procs and procs % t == 0] if colocate else [1]:
                candidate = replace(run, processes=procs, micro_batch=mb, gradient_accumulation_steps=accumulate,
                                    generation_batch=generation, vllm_tensor_parallel_size=tp)
                if colocate:  # raised only as far as vLLM needs, never lowered: the pool's headroom is the user's
                    util = max(run.vllm_gpu_memory_utilization, vllm_utilization_needed(facts, candidate, tp))
                    if util >= 0.95:
                        continue
                    candidate = replace(candidate, vllm_gpu_memory_utilization=util)
                yield candidate
            if mb % 2:
                break
            mb //= 2
        procs *= 2


def _changes(run: RunShape, new: RunShape) -> dict:
    flags = {}
    if new.processes != run.processes:
        flags["processes"] = new.processes  # accelerate launch --num_processes / make flexai-train ACCELS=
    if new.vllm_tensor_parallel_size != run.vllm_tensor_parallel_size:
        flags["--vllm_tensor_parallel_size"] = new.vllm_tensor_parallel_size
    if new.vllm_gpu_memory_utilization != run.vllm_gpu_memory_utilization:
        flags["--vllm_gpu_memory_utilization"] = new.vllm_gpu_memory_utilization
    if new.micro_batch != run.micro_batch:
        flags["--per_device_train_batch_size"] = new.micro_batch
    if new.gradient_accumulation_steps != run.gradient_accumulation_steps:
        flags["--gradient_accumulation_steps"] = new.gradient_accumulation_steps
    return flags


def flags_text(flags: dict) -> str:
    parts = [f"{k} {v}" for k, v in flags.items() if k != "processes"]
    if "processes" in flags:
        parts.insert(0, f"{flags['processes']} GPUs (make flexai-train ACCELS={flags['processes']})")
    return " ".join(parts)


# The two flags most likely to fix a run whose largest term is this one.
REMEDIES = {
    SHARDS: "more GPUs (make flexai-train ACCELS=4, or accelerate launch --num_processes) or offload_param_device: cpu "
            "in code/vlm-grpo/deepspeed_zero3.yaml",
    PERSISTENT: "a lower --zero3_param_persistence_threshold or more GPUs (make flexai-train ACCELS=4)",
    GATHERED: "more GPUs (make flexai-train ACCELS=4) or offload_param_device: cpu in "
              "code/vlm-grpo/deepspeed_zero3.yaml",
    LORA: "a smaller --lora_r or fewer --lora_target_modules",
    ACTIVATIONS: "a smaller --per_device_train_batch_size (raise --gradient_accumulation_steps to keep the batch) or "
                 "a smaller --max_image_side",
    ACTIVATIONS_FULL: "--gradient_checkpointing or a smaller --per_device_train_batch_size",
    LOGITS: "a smaller --per_device_train_batch_size (raise --gradient_accumulation_steps to keep the batch) or a "
            "shorter --max_completion_length",
    VISION: "a smaller --max_image_side or a smaller --per_device_train_batch_size",
    GENERATION: "--use_vllm --vllm_mode colocate or more GPUs (make flexai-train ACCELS=4)",
    VLLM_POOL: "a lower --vllm_gpu_memory_utilization or a higher --vllm_tensor_parallel_size",
    CONTEXT: "more GPUs",
}


def verdict_line(est: Estimate) -> str:
    """One line: the estimate on the card, its largest term, and the verdict."""
    run = est.run
    name, gib = est.largest
    head = (f"{est.facts.name}: {est.total_gib:.1f} GiB per GPU predicted on {run.processes} x "
            f"{run.gpu_memory_gib:g} GB (largest term: {name} {gib:.1f} GiB)")
    if est.pool_too_small:
        return (f"{head}; vLLM's pool ({est.terms[VLLM_POOL]:.1f} GiB = {run.vllm_gpu_memory_utilization:g} x "
                f"{run.gpu_memory_gib:g}) cannot hold its weights and reserve ({est.vllm_weights_gib:.1f} GiB per "
                f"GPU at --vllm_tensor_parallel_size {run.vllm_tensor_parallel_size})")
    if not est.fits:
        return f"{head}: over the card"
    if est.tight:
        return f"{head}: fits, within 10 % of the card"
    return f"{head}: fits"


def refusal(est: Estimate) -> str:
    """The one-line refusal of a run predicted not to fit: the verdict, then the two flags (with values where a
    search finds a change that fits)."""
    if est.pool_too_small:
        remedy = "a higher --vllm_tensor_parallel_size or --vllm_gpu_memory_utilization"
    else:
        remedy = REMEDIES[est.largest[0]]
    found = make_it_fit(est.facts, est.run)
    fix = f"; e.g. {flags_text(found)}" if found else ""
    return f"{verdict_line(est)}. Try {remedy}{fix} (fit check, --gpu_memory_gb {est.run.gpu_memory_gib:g})"


# ---- facts from a config -----------------------------------------------------------------------------------------


def model_facts(config, name: str | None = None, lora_target_modules=None, lora_r: int = 16,
                persistence_threshold: int | None = None) -> ModelFacts:
    """The estimate's facts about a model, from its config: parameters counted as transformers builds it (Qwen2-VL,
    Qwen2.5-VL and Qwen3-VL alike), sizes read from the text and vision configs."""
    text = config.get_text_config()
    vision = config.vision_config
    census = _census(config.to_json_string(use_diff=False))
    if persistence_threshold is None:
        persistence_threshold = 10 * text.hidden_size  # accelerate's "auto" (transformers' deepspeed integration)
    total = sum(census["sizes"])
    if not lora_target_modules:
        lora = 0
    elif lora_target_modules in ("all-linear", ["all-linear"]):  # PEFT's keyword: every Linear but the output head
        lora = sum(lora_r * (i + o) for name, i, o in census["linears"] if name != census["head"])
    else:  # PEFT's rule: a target matches a whole dotted component at the end of the module's name
        lora = sum(lora_r * (i + o) for name, i, o in census["linears"]
                   if any(name == t or name.endswith("." + t) for t in lora_target_modules))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vision_hidden = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL: embed_dim is the tower's width
    vision_mlp = getattr(vision, "intermediate_size", None) or vision_hidden * getattr(vision, "mlp_ratio", 4)
    return ModelFacts(
        name=name or getattr(config, "_name_or_path", "") or config.model_type,
        parameters=total,
        persistent_parameters=sum(n for n in census["sizes"] if n < persistence_threshold),
        gathered_parameters=max(min(MAX_LIVE_PARAMETERS, total), census["largest_layer"] + max(census["sizes"])),
        lora_parameters=lora,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        intermediate_size=text.intermediate_size,
        vocab_size=text.vocab_size,
        kv_bytes_per_token=text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * BF16,
        vision_hidden_size=vision_hidden,
        vision_intermediate_size=int(vision_mlp),
        patches_per_token=vision.spatial_merge_size**2,
        tied_head=census["tied"],
    )


@functools.lru_cache(maxsize=16)
def _census(config_json: str) -> dict:
    """Build the model on the meta device (nothing allocated, ~1 s for a 32B) and note what the facts need: every
    parameter's size (a tied head once), the largest decoder layer or vision block, every Linear's name and shape."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    spec = json.loads(config_json)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"), _without_zero3_init():
        model = AutoModelForImageTextToText.from_config(config)
    modules = list(model.named_modules())
    blocks = [m for n, m in modules if n.endswith(("layers", "blocks")) and isinstance(m, torch.nn.ModuleList)]
    head = model.get_output_embeddings()
    return {
        "sizes": [p.numel() for p in model.parameters()],
        "largest_layer": max(sum(p.numel() for p in block.parameters()) for group in blocks for block in group),
        "linears": [(n, m.in_features, m.out_features) for n, m in modules if isinstance(m, torch.nn.Linear)],
        "head": next(n for n, m in modules if m is head),
        "tied": head.weight is model.get_input_embeddings().weight,
    }


@contextlib.contextmanager
def _without_zero3_init():
    """Under `accelerate launch` with ZeRO-3 the trainer's DeepSpeed config is already registered with transformers
    (zero3.configure_zero3), and from_config would then build the model inside deepspeed.zero.Init, which partitions
    real tensors and fails on meta ones (`IndexError: index ... out of bounds for dimension 0 with size 0` in
    _init_weights). The count needs no partitioning: the registration is lifted for the build and put back."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def tokens_per_image_side(config, side: int) -> int:
    """LLM tokens of a side x side image (Qwen's smart_resize: sides rounded to the patch x merge grid)."""
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    cells = max(1, round(side / factor))
    return cells * cells


# ---- the dry run's check -----------------------------------------------------------------------------------------


def run_shape(script_args, training_args, model_args, survey: dict | None, gpu_memory_gib: float,
              processes: int | None = None) -> RunShape:
    """The run's shape from its arguments and the dry run's survey of the data (longest prompt, image tokens)."""
    policy = script_args.image_policy
    prompt = None
    image_tokens = 0
    if survey:
        prompt = (survey["prompt_tokens"].get(policy) or {}).get("max")
        tokens = survey["image_tokens"].get("downscale" if policy == "downscale" else "original") or {}
        image_tokens = tokens.get("max") or 0
    if prompt is None or (script_args.max_prompt_length and prompt > script_args.max_prompt_length):
        prompt = script_args.max_prompt_length or 0  # rows longer than it are dropped before training
    if training_args.use_vllm:
        generation = "vllm-colocate" if training_args.vllm_mode == "colocate" else "vllm-server"
    else:
        generation = "transformers"
    procs = processes or training_args.world_size
    return RunShape(
        processes=procs,
        gpu_memory_gib=gpu_memory_gib,
        micro_batch=training_args.per_device_train_batch_size,
        prompt_tokens=int(prompt),
        completion_tokens=training_args.max_completion_length,
        image_tokens=int(image_tokens),
        generation_batch=training_args.generation_batch_size // training_args.world_size,
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        generation=generation,
        vllm_gpu_memory_utilization=training_args.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=training_args.vllm_tensor_parallel_size,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
    )


def check_fit(script_args, training_args, model_args, survey: dict | None) -> dict:
    """The dry run's fit check: the estimate on --gpu_memory_gb for the run's processes (refused in one line when
    it cannot fit, a warning within 10 %), and on 80 and 141 GB cards for comparison."""
    from vllm_colocate import model_config

    config = model_config(model_args)
    try:
        facts = model_facts(
            config,
            name=model_args.model_name_or_path,
            lora_target_modules=model_args.lora_target_modules if model_args.use_peft else None,
            lora_r=model_args.lora_r,
            persistence_threshold=script_args.zero3_param_persistence_threshold,
        )
    except (AttributeError, KeyError, ValueError) as err:  # not a vision-language config transformers can build
        logger.warning("fit check skipped: %s cannot be sized from its config (%s)", model_args.model_name_or_path, err)
        return {"skipped": str(err)}
    card = script_args.gpu_memory_gb
    est = estimate(facts, run_shape(script_args, training_args, model_args, survey, card))
    report = {
        "gpu_memory_gb": card,
        "processes": est.run.processes,
        "per_gpu_gib": round(est.total_gib, 1),
        "largest_term": est.largest[0],
        "terms_gib": {k: round(v, 2) for k, v in est.terms.items()},
        "peak_phase": est.phase,
        "verdict": verdict_line(est),
        "cards": {},
    }
    # the seed's job has 2 GPUs: a dry run outside `accelerate launch` (1 process) shows those too
    for procs in sorted({est.run.processes, 2}):
        for gb in CARDS_GB:
            other = estimate(facts, replace(est.run, processes=procs, gpu_memory_gib=gb))
            fix = make_it_fit(facts, other.run)
            report["cards"][f"{procs}x{gb}GB"] = {
                "verdict": verdict_line(other),
                "fits": other.fits,
                "make_it_fit": flags_text(fix) if fix else ("" if fix == {} else "not with up to 8 GPUs"),
            }
            logger.info("fit check: %s", report["cards"][f"{procs}x{gb}GB"]["verdict"])
    if not est.fits:
        raise ConfigError(refusal(est))
    if est.tight:
        logger.warning("fit check: %s; fragmentation of the allocator's cache (5.8-15.3 GiB above the allocated "
                       "peak in the bench runs) may not leave room: consider %s", verdict_line(est),
                       REMEDIES[est.largest[0]])
    return report
