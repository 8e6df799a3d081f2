"""Tiny adapters (and a mismatched tiny model) for the evaluation, merge and inference tests; the tiny model itself
is conftest.py's `tiny_model` fixture.

Built once per test process into a temporary folder: session fixtures in several test files call these cached
helpers, and pytest would otherwise build one copy per file.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "scripts", REPO / "code" / "vlm-grpo"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

_ROOT = Path(tempfile.mkdtemp(prefix="vlm-grpo-tiny-"))


@functools.cache
def wide_model_dir() -> Path:
    """Another tiny Qwen2.5-VL whose text layers are twice as wide: an adapter of the tiny one cannot fit it."""
    import make_tiny_model
    from model_presets import PRESETS

    spec = {k: dict(v) if isinstance(v, dict) else v for k, v in PRESETS["tiny"].items()}
    spec["text"].update(hidden_size=256, intermediate_size=512, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    spec["vision"].update(out_hidden_size=256)  # the merger projects into the text width
    PRESETS["_wide_test"] = spec
    try:
        return make_tiny_model.build(_ROOT / "wide-qwen2.5-vl", preset="_wide_test")
    finally:
        del PRESETS["_wide_test"]


@functools.cache
def make_adapter(base: Path, name: str = "adapter") -> Path:
    """A LoRA adapter on q_proj/v_proj of the tiny model with random (non-zero) B, saved as training saves one:
    adapter files plus the processor, base_model_name_or_path pointing at the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor

    from adapters import load_base_model

    model = load_base_model(str(base), dtype="float32")
    torch.manual_seed(1)
    # init_lora_weights=False: B random instead of zero, so the adapter changes the outputs (a trained one does)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    out = _ROOT / name
    peft_model.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return out
