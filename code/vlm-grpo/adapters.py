"""Finding, checking and loading the LoRA adapters that grpo_vlm.py saves, for merging, evaluation and inference.

A training run leaves the final adapter in `--output_dir` and intermediate ones in `--output_dir/checkpoint-N/`;
`flexai checkpoint fetch` downloads either kind of folder. `find_adapter_dir` accepts all of them, so users can
point every script at whatever they fetched. The checks here turn PEFT's low-level failures (a `size mismatch`
deep in `load_state_dict`, a silently wrong base) into one message that says what to pass instead.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from path_checks import first_line

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class AdapterError(ValueError):
    """A missing, unreadable or mismatched adapter: the message says what was expected and how to fix it."""


# ---- locating -----------------------------------------------------------------------------------------------


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and any((path / w).is_file() for w in ADAPTER_WEIGHTS)


def find_adapter_dir(path: str | Path) -> Path:
    """The adapter folder inside `path`: `path` itself when it holds the adapter files (a final save, or one
    fetched checkpoint), else its newest `checkpoint-N/` holding one (a run's output dir), else the only
    adapter folder found up to 3 levels down (a fetched checkpoint unpacked into a folder of its own)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise AdapterError(f"adapter path {root} does not exist: pass the training --output_dir, a checkpoint-N "
                           "folder, or the folder `flexai checkpoint fetch` wrote")
    if root.is_file():
        raise AdapterError(f"adapter path {root} is a file: pass the folder holding {ADAPTER_CONFIG}")
    if is_adapter_dir(root):
        return root
    if (root / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{root} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): "
                           "the download or the save was incomplete")
    checkpoints = sorted(
        (int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _CHECKPOINT_RE.match(d.name))
    )
    for _, ckpt in reversed(checkpoints):
        if is_adapter_dir(ckpt):
            return ckpt
    found = sorted({p.parent for depth in (1, 2, 3) for p in root.glob("*/" * depth + ADAPTER_CONFIG)})
    found = [d for d in found if is_adapter_dir(d)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        listing = ", ".join(str(d) for d in found[:6])
        raise AdapterError(f"{root} holds several adapters ({listing}): pass one of them")
    if (root / "config.json").is_file():
        raise AdapterError(f"{root} is a full model (config.json, no {ADAPTER_CONFIG}), not a LoRA adapter: use it "
                           "directly as the model (it needs no merge)")
    raise AdapterError(f"no LoRA adapter in {root}: expected {ADAPTER_CONFIG} with {ADAPTER_WEIGHTS[0]}, or "
                       "checkpoint-N/ folders holding them (what grpo_vlm.py --use_peft saves)")


def read_adapter_config(adapter_dir: Path) -> dict:
    try:
        return json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{adapter_dir / ADAPTER_CONFIG} is not valid JSON: {err}") from err


# ---- checking -----------------------------------------------------------------------------------------------


def check_adapter_file(adapter: Path) -> None:
    """The adapter file a training run just saved holds LoRA tensors, none of them empty (grpo_vlm.save_outputs)."""
    from safetensors import safe_open

    with safe_open(str(adapter), framework="pt") as f:
        keys = list(f.keys())
        empty = [k for k in keys if f.get_slice(k).get_shape() in ([], [0])]
    if not keys or empty:
        raise RuntimeError(
            f"{adapter} holds no LoRA weights ({len(keys)} tensors, {len(empty)} empty): under ZeRO-3 the accelerate "
            "config needs `zero3_save_16bit_model: true` (trl#4416, peft#2892)."
        )


def _model_name(path_or_id: str) -> str:
    return Path(str(path_or_id).rstrip("/")).name.lower()


def check_base_name(adapter_dir: Path, base: str) -> None:
    """Refuse a base model other than the one the adapter was trained on.

    The adapter records `base_model_name_or_path` as the training run saw it: a hub id, or a path relative to the
    job's working directory. So the check accepts the same folder, or the same final name component (the hub id
    `Qwen/Qwen2.5-VL-3B-Instruct` matches a local copy `/models/Qwen2.5-VL-3B-Instruct`), and refuses the rest,
    e.g. a 3B adapter with the 7B base: LoRA shapes can coincide across sizes, and the result would be garbage."""
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not recorded:
        logger.warning("%s records no base model: only the weight shapes are checked", adapter_dir / ADAPTER_CONFIG)
        return
    same_folder = Path(recorded).expanduser().exists() and Path(base).expanduser().exists() and (
        Path(recorded).expanduser().resolve() == Path(base).expanduser().resolve()
    )
    if same_folder or _model_name(recorded) == _model_name(base):
        return
    raise AdapterError(
        f"base model mismatch: the adapter in {adapter_dir} was trained on {recorded!r} (its {ADAPTER_CONFIG}, "
        f"base_model_name_or_path), but the base model given is {base!r}. Pass --model_name_or_path {recorded}, or "
        "--ignore_base_name if the given model is a copy of that one under another name."
    )


def check_adapter_shapes(model, adapter_dir: Path) -> None:
    """Refuse an adapter whose LoRA matrices do not fit the base model's layers, before PEFT's state-dict error.

    lora_A is [r, in_features] and lora_B [out_features, r] of the layer they adapt."""
    import torch
    from safetensors import safe_open

    weights = adapter_dir / ADAPTER_WEIGHTS[0]
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        shapes = {k: tuple(v.shape) for k, v in torch.load(adapter_dir / ADAPTER_WEIGHTS[1], map_location="cpu").items()}
    modules = dict(model.named_modules())
    problems = []
    for key, shape in shapes.items():
        m = re.match(r"^(?:base_model\.model\.)?(.*)\.(lora_[AB])(?:\.[^.]+)?\.weight$", key)
        if not m:
            continue
        name, which = m.groups()
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "in_features"):
            problems.append(f"{name}: no such linear layer in the base model")
        elif which == "lora_A" and shape[1] != layer.in_features:
            problems.append(f"{name}: adapter expects {shape[1]} input features, base layer has {layer.in_features}")
        elif which == "lora_B" and shape[0] != layer.out_features:
            problems.append(f"{name}: adapter expects {shape[0]} output features, base layer has {layer.out_features}")
        if len(problems) >= 3:
            break
    if problems:
        raise AdapterError(
            f"the adapter in {adapter_dir} does not fit the base model ({type(model).__name__}): "
            + "; ".join(problems)
            + ". It was trained on another base model: pass the one named in its adapter_config.json."
        )


# ---- loading ------------------------------------------------------------------------------------------------


def load_base_model(name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    """The base VLM, with the class its config names (as TRL's GRPOTrainer loads it, so LoRA keys line up)."""
    import torch
    import transformers
    from transformers import AutoConfig

    from vision_attention import enable_batched_vision_attention

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as err:  # transformers' message spans several lines: the scripts print one
        raise AdapterError(f"cannot load model {name_or_path!r}: {first_line(err)}") from err
    arch = getattr(transformers, (config.architectures or ["AutoModelForImageTextToText"])[0])
    torch_dtype = config.torch_dtype if dtype == "auto" else getattr(torch, dtype)
    enable_batched_vision_attention()  # evaluation and inference get training's faster, equal vision attention
    model = arch.from_pretrained(name_or_path, dtype=torch_dtype)
    return model.to(device).eval()


def attach_adapter(model, adapter_dir: Path, base: str, ignore_base_name: bool = False):
    """`model` wrapped in a PeftModel carrying the adapter, after the name and shape checks."""
    from peft import PeftModel

    if not ignore_base_name:
        check_base_name(adapter_dir, base)
    check_adapter_shapes(model, adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()


def load_processor(*candidates: str | Path):
    """The processor of the first folder that has one (training saves it beside the adapter), left-padded for
    batched generation."""
    from transformers import AutoProcessor

    errors = []
    for path in candidates:
        if path is None:
            continue
        try:
            return AutoProcessor.from_pretrained(str(path), padding_side="left")
        except (OSError, ValueError) as err:
            errors.append(f"{path}: {first_line(err)}")
    raise AdapterError("no processor found: " + " | ".join(errors))
