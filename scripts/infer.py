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

`--endpoint URL` asks an OpenAI-compatible server instead (a FlexAI inference endpoint, `make flexai-serve`, or a
local `vllm serve outputs/merged`): the same prompt, the image sent inline as a base64 data URL, greedy by default.
The API key is read from FLEXAI_API_KEY (or OPENAI_API_KEY) and never printed; `--served_model` defaults to the
first model the server lists:

    FLEXAI_API_KEY=... python scripts/infer.py --endpoint https://<endpoint-url> --image photo.png \\
        --question "How many red circles are in the image?"
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request
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


# ---- an OpenAI-compatible endpoint (vLLM behind `flexai inference serve`) -------------------------------------------

API_KEY_VARIABLES = ("FLEXAI_API_KEY", "OPENAI_API_KEY")


def image_data_url(image_path: str) -> str:
    """The image file inline, as OpenAI's chat API takes it (`data:image/png;base64,...`); checked to be an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image_path) as image:
            mime = Image.MIME.get(image.format, "image/png")
        data = Path(image_path).read_bytes()
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read --image {image_path}: {err}") from err
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def endpoint_messages(question: str, image_url: str) -> list[dict]:
    """data.make_prompt's conversation in OpenAI's format: the system prompt, then the image before the question,
    where TRL puts it in training."""
    system, user = make_prompt(question, SYSTEM_PROMPT)
    return [system, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                 {"type": "text", "text": user["content"]}]}]


def _request(url: str, payload: dict | None = None, timeout: float = 600) -> dict:
    headers = {"Content-Type": "application/json"}
    key = next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(payload).encode() if payload is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:  # the server's own reason, first line only (vLLM sends JSON)
        body = err.read().decode(errors="replace").strip().splitlines()
        hint = f" (set {' or '.join(API_KEY_VARIABLES)})" if err.code in (401, 403) else ""
        raise ValueError(f"{url} answered HTTP {err.code}{hint}: {body[0][:300] if body else err.reason}") from err
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise ValueError(f"cannot reach {url}: {getattr(err, 'reason', err)}") from err


def ask_endpoint(endpoint: str, image_path: str, question: str, max_new_tokens: int = 1024, temperature: float = 0.0,
                 served_model: str | None = None, timeout: float = 600) -> tuple[str, str | None, dict]:
    """(the completion, the answer rewards.py would grade, the server's reply) from an OpenAI-compatible server."""
    if not question.strip():
        raise ValueError("--question is empty")
    base = endpoint.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    image_url = image_data_url(image_path)
    if served_model is None:
        models = _request(f"{base}/models", timeout=timeout).get("data") or []
        if not models:
            raise ValueError(f"{base}/models lists no model: pass --served_model")
        served_model = models[0]["id"]
    reply = _request(f"{base}/chat/completions", {
        "model": served_model,
        "messages": endpoint_messages(question, image_url),
        "max_tokens": max_new_tokens,
        "temperature": temperature,
    }, timeout=timeout)
    completion = reply["choices"][0]["message"]["content"] or ""
    return completion, extract_prediction(completion), reply


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or hub id (e.g. merge_lora.py's --output_dir); or --endpoint")
    parser.add_argument("--endpoint", help="URL of an OpenAI-compatible server (FlexAI inference endpoint, vllm serve) "
                                           "to ask instead of loading --model; API key from FLEXAI_API_KEY")
    parser.add_argument("--served_model", help="with --endpoint: the model name the server serves (default: its first)")
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    parser.add_argument("--question", required=True, help="the question about the image")
    parser.add_argument("--adapter", help="optional LoRA adapter to put on --model (instead of a merged model)")
    parser.add_argument("--max_new_tokens", type=int, default=1024, help="completion length cap")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.endpoint):
        parser.error("give one of --model (load it here) or --endpoint (ask a server)")
    if args.endpoint and args.adapter:
        parser.error("--adapter needs --model: a served model is already merged (make merge)")
    try:
        if args.endpoint:
            completion, prediction, _ = ask_endpoint(args.endpoint, args.image, args.question, args.max_new_tokens,
                                                     args.temperature, args.served_model)
        else:
            completion, prediction = answer(args.model, args.image, args.question, args.adapter,
                                            args.max_new_tokens, args.temperature)
    except (AdapterError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(completion)
    print(f"answer: {prediction}")
    return prediction


if __name__ == "__main__":
    main()
