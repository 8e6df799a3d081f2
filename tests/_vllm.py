"""vLLM (the CPU build of `make vllm-cpu`) inside the test process: one engine per tiny model, and its own view of
prompts.

`engine_prompt_ids` runs vLLM's input preprocessing (`LLMEngine.processor.process_inputs`: tokenizer, multimodal
processor, placeholder expansion), the exact code a request goes through before the model sees it, and returns the
prompt ids the engine would run. Nothing of vLLM's logic is copied here.

Where vLLM cannot be built (not Linux x86-64) the tests that need it skip with the reason; where it can, a missing
vLLM is a failure (set-up did not run), never a silent skip.
"""

from __future__ import annotations

import functools
import os
import uuid

import pytest

from _tiny import REPO  # noqa: F401  (puts scripts/ and code/vlm-grpo/ on sys.path)

# One engine in this process, no engine-core subprocess; a small KV cache (vLLM's CPU default is 4 GiB).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def require_vllm() -> None:
    """Skip where the CPU build cannot work; fail where it can but vLLM is missing."""
    import build_vllm_cpu

    try:
        import vllm  # noqa: F401
    except ImportError:
        reason = build_vllm_cpu.unsupported_reason()
        if reason:
            pytest.skip(reason)
        pytest.fail("vLLM is not installed in this environment: run `make vllm-cpu` (make test does it first)")


@functools.cache
def engine(model_dir: str, dtype: str = "bfloat16"):
    """A `vllm.LLM` on a tiny model, built once per process (the seed trains in bfloat16)."""
    require_vllm()
    from vllm import LLM

    from vllm_colocate import cpu_thread_binding_workaround

    cpu_thread_binding_workaround()  # the engine shares the test process's cores, as it shares the trainer's (M9)
    # mm_processor_cache_gb=0: every call runs the multimodal processor, none answers from a cache
    return LLM(model=str(model_dir), dtype=dtype, max_model_len=2048, max_num_batched_tokens=2048,
               mm_processor_cache_gb=0, seed=0)


def engine_prompt_ids(model_dir, prompts: list[dict]) -> list[list[int]]:
    """The prompt ids vLLM's engine would run for each prompt ({"prompt_token_ids": [...], "multi_modal_data":
    {"image": PIL.Image}} or any other vLLM prompt form)."""
    from vllm import SamplingParams

    processor = engine(str(model_dir)).llm_engine.processor
    params = SamplingParams(max_tokens=1)
    return [list(processor.process_inputs(f"test-{uuid.uuid4()}", p, params)[1].prompt_token_ids) for p in prompts]
