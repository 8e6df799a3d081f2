"""What the seed's generation path (`--use_vllm --vllm_mode colocate`, TRL 1.2.0 + vLLM 0.11.0) needs to run right.

Each fix names the failure it prevents (its id in the fix ledger, experiments/vlm-grpo/INTERNALS.md) and its root
cause; all are exercised through vLLM itself by tests/test_vllm_colocate.py (CPU build of vLLM, 2-process ZeRO-3).

M8  first rollout: `ValueError: Attempted to assign 16 + ... = 128 multimodal tokens to 248 placeholders`.
    TRL tokenizes the prompt with the HF processor, which already expanded each image's `<|image_pad|>` into one
    token per 28x28 patch, and hands vLLM those ids *and* the image. vLLM 0.11.0's Qwen2.5-VL input processor
    expands every `<|image_pad|>` it finds again (huggingface/trl#6294, open; fix PRs #6718/#6719). Fix: vLLM gets
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
"""

from __future__ import annotations

import contextlib
import functools
import logging

logger = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"


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
