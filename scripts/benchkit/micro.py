"""Micro-benchmarks the parent runs as children, each printing JSON: the bf16 matmul rate of each GPU, the vision tower
(per-window loop vs batched attention), one rollout's image preprocessing (with and without the per-image dedupe)."""

from __future__ import annotations

import json
import statistics
import sys
import time

from . import RECIPE


def measure_matmul() -> None:
    """Print the bf16 matmul rate of each visible GPU as JSON (run in a child so the parent holds no CUDA context)."""
    import torch

    n, rates = 8192, []
    for i in range(torch.cuda.device_count()):
        with torch.cuda.device(i):
            a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            for _ in range(5):
                a @ b
            times = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            rates.append({"gpu": i, "name": torch.cuda.get_device_name(i), "tflops": 2 * n**3 / statistics.median(times) / 1e12})
            del a, b
    print(json.dumps(rates))


def measure_vision(model_dir: str, image_side: int, images: int = 16) -> None:
    """Time the vision tower on one micro-batch of images (GPU 0, bf16, no grad): transformers' per-window attention
    loop vs code/vlm-grpo/vision_attention.py's batched form; print both and their difference as JSON."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(RECIPE))
    from vision_attention import enable_batched_vision_attention

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    visual = model.visual.to(device).eval()
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (image_side, image_side, 3), dtype=np.uint8)) for _ in range(images)]
    inputs = processor.image_processor(images=pics, return_tensors="pt")
    pixels, grid = inputs["pixel_values"].to(device, torch.bfloat16), inputs["image_grid_thw"].to(device)
    result, outs = {"images": images, "image_side": image_side, "patches": int(grid.prod(dim=1).sum())}, {}
    for name, batched in (("upstream_loop", False), ("batched", True)):
        enable_batched_vision_attention(batched)
        times = []
        with torch.no_grad():
            for i in range(8):
                sync()
                t0 = time.perf_counter()
                outs[name] = visual(pixels, grid_thw=grid)
                sync()
                if i >= 3:  # the first calls warm up kernels and the allocator
                    times.append(time.perf_counter() - t0)
        result[f"{name}_ms"] = 1e3 * statistics.median(times)
    a, b = outs["upstream_loop"].float(), outs["batched"].float()
    result["max_abs_diff"] = float((a - b).abs().max())
    result["rel_l2_diff"] = float((a - b).norm() / a.norm())
    print(json.dumps(result))


def measure_image_dedupe(model_dir: str, image_side: int, distinct: int = 8, repeats: int = 8) -> None:
    """Time one rollout's image preprocessing as TRL 1.2.0 does it (the chat template with the images, then the
    processor on text and images) for `distinct` images each repeated `repeats` times (num_generations), with the
    processor's own image processor and with fast_paths.py's DedupedImageProcessor; print both as JSON."""
    import numpy as np
    from transformers import AutoProcessor

    sys.path.insert(0, str(RECIPE))
    from fast_paths import DedupedImageProcessor
    from PIL import Image

    processor = AutoProcessor.from_pretrained(model_dir, padding_side="left")
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (image_side, image_side, 3), dtype=np.uint8)) for _ in range(distinct)]
    images = [[pic.copy()] for pic in pics for _ in range(repeats)]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": im[0]}, {"type": "text", "text": "?"}]}]
                     for im in images]
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)

    def rollout():
        processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
        return processor(images=images, text=texts, padding=True, return_tensors="pt")

    result = {"images": len(images), "distinct": distinct, "image_side": image_side, "threads": __import__("torch").get_num_threads()}
    inner = processor.image_processor
    for name in ("upstream", "deduped", "upstream", "deduped"):  # alternated, the second round reported
        if name == "deduped":
            processor.image_processor = DedupedImageProcessor(inner)
        t0 = time.perf_counter()
        out = rollout()
        result[f"{name}_s"] = time.perf_counter() - t0
        result[f"{name}_pixel_sum"] = float(out["pixel_values"].double().sum())
        processor.image_processor = inner
    print(json.dumps(result))
