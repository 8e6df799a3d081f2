"""What the seed's generation path (`--use_vllm --vllm_mode colocate`, TRL 1.2.0 + vLLM 0.11.0) needs to run right.

Each fix names the failure it prevents (its id in the fix ledger, experiments/vlm-grpo/INTERNALS.md) and its root
cause; all are exercised through vLLM itself by tests/test_vllm_colocate.py (CPU build of vLLM, 2-process ZeRO-3).

M8  first rollout: `ValueError: Attempted to assign 16 + ... = 128 multimodal tokens to 248 placeholders`.
    TRL tokenizes the prompt with the HF processor, which already expanded each image's `<|image_pad|>` into one
    token per merged patch (28x28 pixels; 32x32 for Qwen3-VL), and hands vLLM those ids *and* the image. vLLM
    0.11.0's Qwen2-VL, Qwen2.5-VL and Qwen3-VL input processors expand every `<|image_pad|>` they find again
    (huggingface/trl#6294 and, for Qwen3-VL, trl#6401, open; fix PRs #6718/#6719). Fix: vLLM gets
    the same ids with each run of `<|image_pad|>` collapsed to one token, so its own expansion reproduces exactly the
    ids the trainer scores; the ids vLLM reports back are checked against the trainer's, so a future mismatch
    (another processor, a resized image) stops the run with a clear error instead of training on misaligned tokens.
M12 several images a prompt: TRL 1.2.0 builds the colocated engine (`trl/generation/vllm_generation.py`,
    `LLM(...)` in VLLMGeneration's colocate branch) without `limit_mm_per_prompt`, so vLLM 0.11.0 (V1) allows 999
    images and 999 videos a prompt (`vllm/config/multimodal.py`, get_limit_per_prompt) and sizes its multimodal
    profiling for the largest prompt it could get, not the data's; a limit below the data's count refuses the prompt
    ("At most 1 image(s) may be provided in one prompt", what evaluate.py's former hard-coded limit of 1 did to rows
    of two images). `images_per_prompt_limit` sets it from the data: the largest image count of a row. The M8 fix
    already works per image: each image's run of `<|image_pad|>` is collapsed on its own (runs are separated by
    `<|vision_end|><|vision_start|>`), and the check compares every prompt's ids, all its images included.
M9  (CPU build only) rank 1 dies in vLLM's CPU worker (`vllm/v1/worker/cpu_worker.py:61`, `omp_cpuids[self.rank]`;
    with the default "auto" binding the same happens a few lines later, `allowed_numa_nodes[self.local_rank]`): under
    TRL's `external_launcher` every process holds a one-worker engine, but the worker indexes its thread-binding list
    by the global rank. The colocated engine shares its process, and so its cores, with the trainer: it must not pin
    threads at all. `cpu_thread_binding_workaround` makes the worker's auto-binding answer "all" (no pinning). It is
    applied only when no GPU is present; GPU workers never run this code.

The checks the script runs before any weights load, with or without vLLM installed, sit at the end: the engine's
context and TRL's batched-token budget against the data (`check_vllm_limits`, also the dry run's vLLM plan), and LoRA
on a tied output head refused with vLLM rollouts (`check_vllm_lora_targets`).
"""

from __future__ import annotations

import contextlib
import functools
import logging

from config_error import ConfigError

logger = logging.getLogger(__name__)

from families import IMAGE_TOKEN as IMAGE_PAD  # noqa: E402  (the placeholder M8 collapses: families.py)


# ---- M8: prompt ids vLLM expands to exactly the trainer's ----------------------------------------------------------


def collapse_image_pads(ids: list[int], pad_id: int) -> list[int]:
    """`ids` with every run of `pad_id` reduced to a single token: the unexpanded form vLLM's processor expects."""
    out: list[int] = []
    for token in ids:
        if token == pad_id and out and out[-1] == pad_id:
            continue
        out.append(token)
    return out


class PromptMismatchError(RuntimeError):
    """vLLM's view of a prompt differs from the ids the trainer scores."""


def check_engine_prompts(trainer_ids: list[list[int]], engine_ids: list[list[int]]) -> None:
    for i, (ours, theirs) in enumerate(zip(trainer_ids, engine_ids, strict=True)):
        if list(ours) != list(theirs):
            raise PromptMismatchError(
                f"prompt {i}: vLLM expanded it to {len(theirs)} tokens, the trainer scores {len(ours)} "
                "(image placeholders counted differently, fix ledger M8 / trl#6294). The completions would be "
                "scored against a prompt vLLM never saw: stopping. Check that the processor and vLLM see the same "
                "image (same size, same min/max_pixels)."
            )


def align_prompts_with_vllm(vllm_generation, pad_id: int) -> None:
    """Wrap TRL's `VLLMGeneration.generate` (the hand-off to vLLM) with the M8 fix and its check."""
    generate = vllm_generation.generate

    @functools.wraps(generate)
    def generate_with_unexpanded_images(prompts, images, *args, **kwargs):
        if images is None:
            return generate(prompts, images, *args, **kwargs)
        sent = [collapse_image_pads(ids, pad_id) if imgs else ids for ids, imgs in zip(prompts, images, strict=True)]
        prompt_ids, *rest = generate(sent, images, *args, **kwargs)
        check_engine_prompts(prompts, prompt_ids)
        return (prompts, *rest)

    vllm_generation.generate = generate_with_unexpanded_images


# ---- M12: vLLM's per-prompt image limit from the data --------------------------------------------------------------


@contextlib.contextmanager
def images_per_prompt_limit(max_images: int):
    """While active, the engine TRL builds gets `limit_mm_per_prompt={"image": max_images}` (M12)."""
    from trl.generation import vllm_generation

    upstream = vllm_generation.LLM

    def llm_with_image_limit(*args, **kwargs):
        kwargs.setdefault("limit_mm_per_prompt", {"image": max_images})
        logger.info("vLLM: at most %d image(s) per prompt (limit_mm_per_prompt, the data's largest row)", max_images)
        return upstream(*args, **kwargs)

    vllm_generation.LLM = llm_with_image_limit
    try:
        yield
    finally:
        vllm_generation.LLM = upstream


# ---- M9: CPU build only ------------------------------------------------------------------------------------------


def cpu_thread_binding_workaround() -> None:
    """No OpenMP thread pinning by vLLM's CPU worker (M9). Call before the engine is built; a no-op with a GPU."""
    import torch

    if torch.cuda.is_available():
        return
    from vllm.v1.worker.cpu_worker import CPUWorker

    if getattr(CPUWorker._get_autobind_cpu_ids, "_vlm_grpo_m9", False):
        return

    def no_binding(self, cpu_selector):  # replaces vllm/v1/worker/cpu_worker.py's NUMA-node-per-rank binding
        return "all"

    no_binding._vlm_grpo_m9 = True
    CPUWorker._get_autobind_cpu_ids = no_binding
    logger.info("vLLM CPU worker: thread binding off (colocated with the trainer; fix ledger M9)")


# ---- checks before any weights load (grpo_vlm.py's validate_args, setup and --dry_run) ---------------------------


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def model_config(model_args):
    """The model's config.json only (no weights), as the trainer will load it."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
    )


# TRL 1.2.0 builds the colocated engine with max_num_batched_tokens=4096 (trl/generation/vllm_generation.py): a prompt
# longer than that, image tokens included, cannot be scheduled (trl#3788).
VLLM_COLOCATE_BATCHED_TOKENS = 4096


def check_vllm_limits(training_args, model_args, longest_prompt: int | None) -> dict | None:
    """The limits the colocated engine will hold the run to, checked without vLLM: context length against the
    model's, the longest prompt the data produces against TRL's batched-token budget. None without --use_vllm."""
    if not training_args.use_vllm:
        return None
    config = model_config(model_args)
    context = config.get_text_config().max_position_embeddings
    max_model_len = training_args.vllm_max_model_length
    if max_model_len is not None and max_model_len > context:
        raise ConfigError(
            f"vLLM's max model length {max_model_len} (--max_prompt_length + --max_completion_length, or "
            f"--vllm_max_model_length) exceeds the model's context of {context} tokens: lower them."
        )
    if longest_prompt is not None and longest_prompt > VLLM_COLOCATE_BATCHED_TOKENS:
        raise ConfigError(
            f"the longest prompt of the data is {longest_prompt} tokens (image tokens included); TRL 1.2.0's "
            f"colocated vLLM schedules at most {VLLM_COLOCATE_BATCHED_TOKENS} (trl#3788). Set --max_prompt_length "
            f"{VLLM_COLOCATE_BATCHED_TOKENS} or less (longer rows are dropped) or a smaller --max_image_side."
        )
    return {
        "mode": training_args.vllm_mode,
        "installed": vllm_importable(),
        "max_model_len": max_model_len if max_model_len is not None else context,
        "model_context": context,
        "max_num_batched_tokens": VLLM_COLOCATE_BATCHED_TOKENS,
        "longest_prompt": longest_prompt,
        "gpu_memory_utilization": training_args.vllm_gpu_memory_utilization,
    }


def check_vllm_lora_targets(training_args, model_args) -> None:
    """Refuse LoRA on the output head or the embeddings of a model that ties them, with vLLM rollouts.

    TRL 1.2.0 syncs the policy into vLLM by merging LoRA into the weights and loading them by name; a tied model's
    `lm_head` *is* its `embed_tokens` (one tensor in transformers, one module in vLLM), so the merged head also
    replaces vLLM's input embeddings, which the trainer keeps unmerged. The two policies drift apart as the adapter
    grows: measured on the tiny model, the importance-sampling ratio left ~1 after about 16 steps (0.0008..9.6) and
    the learned reward collapsed (experiments/vlm-grpo/cpu-results/vllm-lora-on-tied-lm-head.json). Which checkpoints
    tie them is read from the config (families.tied_lm_head): Qwen2.5-VL-3B, Qwen2-VL-2B and Qwen3-VL-2B/4B do, the
    7B/8B and larger do not; q_proj/v_proj (the seed's targets) are not affected."""
    if not (training_args.use_vllm and model_args.use_peft and model_args.lora_target_modules):
        return
    targets = model_args.lora_target_modules
    targets = [targets] if isinstance(targets, str) else targets
    tied_modules = [t for t in targets if t in ("lm_head", "embed_tokens")]  # PEFT's all-linear skips lm_head
    if not tied_modules:
        return
    from families import tied_lm_head

    if tied_lm_head(model_config(model_args)):
        raise ConfigError(
            f"--lora_target_modules {' '.join(tied_modules)} with --use_vllm: this model ties lm_head to its input "
            "embeddings, so vLLM would run the merged head as its embeddings too and sample from another policy than "
            "the one trained. Drop lm_head/embed_tokens from the targets, or generate with transformers (no --use_vllm)."
        )
