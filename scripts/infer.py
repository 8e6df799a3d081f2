#!/usr/bin/env python
"""Ask a (merged) model one question about one image, with the training prompt, and print its answer.

    python scripts/infer.py --model outputs/merged --image photo.png \\
        --question "How many red circles are in the image?"

Offline, on the tiny model merged by the smoke run (any image works; random weights answer gibberish):

    python scripts/infer.py --model outputs/smoke/merged --image sample.png --question "What number is written?" \\
        --max_new_tokens 32

`--model` is any model folder or hub id (a merge_lora.py output, or the base); `--adapter` puts a LoRA adapter on
it instead of merging. The prompt is the one GRPO trained on (system prompt asking for `<think>…</think>
<answer>…</answer>`), and the answer inside `<answer>` is printed on the last line, parsed as rewards.py grades it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code" / "vlm-grpo"))

from adapters import AdapterError, attach_adapter, find_adapter_dir, load_base_model, load_processor  # noqa: E402
from data import make_prompt  # noqa: E402
from generation import GenerationSettings, hf_generate  # noqa: E402
from path_checks import check_model_path  # noqa: E402
from rewards import SYSTEM_PROMPT, extract_prediction  # noqa: E402


def answer(model_path: str, image_path: str, question: str, adapter: str | None = None, max_new_tokens: int = 1024,
           temperature: float = 0.0) -> tuple[str, str | None]:
    """(the completion, the answer rewards.py would grade) for one image and question."""
    import torch
    from PIL import Image, UnidentifiedImageError

    if not question.strip():
        raise ValueError("--question is empty")
    check_model_path(model_path, "--model")
    adapter_dir = find_adapter_dir(adapter) if adapter else None  # its one-line error before the model loads
    try:
        image = Image.open(image_path).convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read --image {image_path}: {err}") from err
    on_gpu = torch.cuda.is_available()
    model = load_base_model(model_path, dtype="bfloat16" if on_gpu else "float32", device="cuda" if on_gpu else "cpu")
    processor = load_processor(model_path)
    if adapter_dir:
        model = attach_adapter(model, adapter_dir, model_path)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, num_samples=1, batch_size=1)
    torch.manual_seed(0)
    (completion,) = hf_generate(model, processor, [make_prompt(question, SYSTEM_PROMPT)], [image], settings)[0]
    return completion, extract_prediction(completion)


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or hub id (e.g. merge_lora.py's --output_dir)")
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    parser.add_argument("--question", required=True, help="the question about the image")
    parser.add_argument("--adapter", help="optional LoRA adapter to put on --model (instead of a merged model)")
    parser.add_argument("--max_new_tokens", type=int, default=1024, help="completion length cap")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    args = parser.parse_args(argv)
    try:
        completion, prediction = answer(args.model, args.image, args.question, args.adapter, args.max_new_tokens,
                                        args.temperature)
    except (AdapterError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(completion)
    print(f"answer: {prediction}")
    return prediction


if __name__ == "__main__":
    main()
