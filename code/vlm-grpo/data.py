"""Dataset loading and hygiene for GRPO on images: every row that reaches the trainer can be decoded, is RGB, is
small enough, fits `max_prompt_length` with its image tokens, and has a gold answer.

Sources (`--dataset_name`): a hub id (default `lmms-lab/multimodal-open-r1-8k-verified`), a local parquet file or
folder of them, a `Dataset.save_to_disk` folder, a jsonl file whose `image` column holds paths (relative to the
file), or `synthetic` (synthetic_data.py). Each row needs `image`, `problem` and `solution`.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rewards import SYSTEM_PROMPT

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "problem", "solution")
SYNTHETIC = "synthetic"


class DatasetError(ValueError):
    """Bad dataset input: the message says what is wrong and how to fix it."""


@dataclass
class FilterStats:
    """Rows seen and dropped per reason, logged once so users know what their data lost."""

    total: int = 0
    dropped: Counter = field(default_factory=Counter)
    source_rows: int = 0  # rows in the source, before --max_train_samples or a dry run's sample

    @property
    def kept(self) -> int:
        return self.total - sum(self.dropped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return f"kept {self.kept}/{self.total} rows (dropped: {reasons})"


# ---- loading ----------------------------------------------------------------------------------------------


def load_raw_dataset(name: str, config: str | None = None, split: str = "train", synthetic_rows: int = 512, seed: int = 0):
    """The raw rows of `name` (see module docstring), one split, before any filtering."""
    import datasets

    if name == SYNTHETIC:
        from synthetic_data import make_synthetic_dataset

        return make_synthetic_dataset(synthetic_rows, seed=seed)

    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DatasetError(f"{path} has splits {sorted(loaded)}, not '{split}': pass --dataset_train_split")
                loaded = loaded[split]
            return loaded
        files = sorted(path.glob("*.parquet")) + sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        parquet = [str(f) for f in files if f.suffix == ".parquet"]
        jsonl = [f for f in files if f.suffix in (".jsonl", ".json")]
        try:
            if parquet:
                return datasets.load_dataset("parquet", data_files=parquet, split="train")
            if jsonl:
                return _load_jsonl(jsonl)
        except (ValueError, OSError, StopIteration, datasets.exceptions.DatasetGenerationError) as err:  # empty, corrupt
            # datasets' own message names no file; its cause says what went wrong
            raise DatasetError(
                f"{path}: could not read it as a dataset ({type(err).__name__}: {err.__cause__ or err}). "
                "Is the file empty or corrupt?"
            ) from err
        raise DatasetError(
            f"{path}: no dataset found. Expected a .parquet file or folder of them, a .jsonl file with an `image` "
            "path column, or a folder written by `Dataset.save_to_disk`."
        )
    if name.startswith((".", "/", "~")) or path.suffix in (".parquet", ".jsonl", ".json"):
        # a path that does not exist: don't report it as an unreachable hub dataset
        raise DatasetError(f"--dataset_name {name!r}: no such file or folder ({path.absolute()})")
    if "/" not in name:
        raise DatasetError(
            f"--dataset_name {name!r} is neither a local path nor a hub id (owner/name), nor '{SYNTHETIC}'."
        )
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub's errors don't say which flag to change
        raise DatasetError(
            f"could not load hub dataset {name!r} (split {split!r}): {type(err).__name__}: {err}. Check the name, "
            "network access and HF_TOKEN, or pass a local path or `synthetic`."
        ) from err


def _load_jsonl(files: list[Path]):
    """jsonl rows whose `image` is a path, relative paths resolved against the file's folder."""
    import datasets

    ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    if "image" in ds.column_names and ds.features["image"] == datasets.Value("string"):
        base = files[0].parent

        def _resolve(row):
            p = Path(row["image"]) if row["image"] else None
            return {"image": {"bytes": None, "path": str(p if p is None or p.is_absolute() else base / p)}}

        ds = ds.map(_resolve, features=_with_raw_image(ds.features))
    return ds


def _with_raw_image(features):
    import datasets

    features = features.copy()
    features["image"] = datasets.Image(decode=False)
    return features


def check_columns(ds) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DatasetError(
            f"dataset is missing column(s) {missing}; it has {ds.column_names}. Each row needs `image` (an image, "
            "or a path in jsonl), `problem` (the question) and `solution` (gold answer, ideally "
            "`<think>...</think><answer>...</answer>`, as in lmms-lab/multimodal-open-r1-8k-verified)."
        )


# ---- hygiene ------------------------------------------------------------------------------------------------


def make_prompt(problem: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """The conversational prompt TRL's GRPOTrainer expects; it inserts the row's image before the user text."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": problem}]


def image_token_count(width: int, height: int, image_processor) -> int:
    """Tokens Qwen2.5-VL spends on one image: one per merged patch after the processor's resize."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    patch, merge = image_processor.patch_size, image_processor.merge_size
    min_pixels = image_processor.min_pixels if image_processor.min_pixels is not None else image_processor.size["shortest_edge"]
    max_pixels = image_processor.max_pixels if image_processor.max_pixels is not None else image_processor.size["longest_edge"]
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // patch) * (w // patch) // (merge * merge)


def prompt_token_count(problem: str, width: int, height: int, processor, system_prompt: str = SYSTEM_PROMPT) -> int:
    """Tokenized length of the full prompt (chat template, image tokens included), without running the image
    processor: the template's single `<|image_pad|>` placeholder is replaced by `image_token_count` tokens."""
    messages = make_prompt(problem, system_prompt)
    messages[1] = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem}]}
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    n_text = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return n_text - 1 + image_token_count(width, height, processor.image_processor)


def _decode(raw) -> "tuple[object | None, str | None]":
    """(PIL image, None) or (None, why it could not be read)."""
    from PIL import Image, UnidentifiedImageError

    if raw is None:
        return None, "missing image"
    try:
        if isinstance(raw, Image.Image):
            image = raw
        elif raw.get("bytes"):
            image = Image.open(io.BytesIO(raw["bytes"]))
        elif raw.get("path"):
            image = Image.open(raw["path"])
        else:
            return None, "missing image"
        image.load()
        return image, None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        logger.debug("undecodable image: %s", err)
        return None, "undecodable image"


def prepare_dataset(
    ds,
    processor,
    max_image_side: int | None = 512,
    max_prompt_length: int | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    num_proc: int | None = None,
):
    """Filter and convert rows; returns (dataset with `prompt`, `image`, `solution`, ..., FilterStats).

    Dropped, with counts: empty problem/solution, missing or undecodable image, an image side over
    `max_image_side` (Qwen2.5-VL spends one token per 28x28 pixels: big images blow memory and vLLM's batch
    budget, trl#3788), prompts over `max_prompt_length` tokens. Kept images are converted to RGB.
    """
    import datasets

    check_columns(ds)
    stats = FilterStats(total=len(ds))
    if isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))  # decode ourselves, so bad bytes can't crash

    def _inspect(row):
        problem, solution = row["problem"], row["solution"]
        if not (isinstance(problem, str) and problem.strip() and isinstance(solution, str) and solution.strip()):
            return {"_drop": "empty problem or solution", "image": None, "prompt_tokens": 0}
        image, why = _decode(row["image"])
        if image is None:
            return {"_drop": why, "image": None, "prompt_tokens": 0}
        width, height = image.size
        if max_image_side and max(width, height) > max_image_side:
            return {"_drop": f"image side > max_image_side={max_image_side}", "image": None, "prompt_tokens": 0}
        n_tokens = prompt_token_count(problem, width, height, processor, system_prompt)
        if max_prompt_length and n_tokens > max_prompt_length:
            return {"_drop": f"prompt > max_prompt_length={max_prompt_length} tokens", "image": None, "prompt_tokens": n_tokens}
        raw = row["image"]
        if image.mode != "RGB" or not isinstance(raw, dict):
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            raw = {"bytes": buf.getvalue(), "path": None}
        return {"_drop": "", "image": raw, "prompt_tokens": n_tokens}

    features = ds.features.copy()
    features["image"] = datasets.Image(decode=False)
    features["_drop"] = datasets.Value("string")
    features["prompt_tokens"] = datasets.Value("int32")
    ds = ds.map(_inspect, features=features, num_proc=num_proc, desc="checking rows")
    stats.dropped.update(d for d in ds["_drop"] if d)
    ds = ds.filter(lambda drop: not drop, input_columns="_drop").remove_columns("_drop")
    logger.info("dataset: %s", stats.summary())
    if len(ds) == 0:
        raise DatasetError(
            f"no rows left after filtering: {stats.summary()}. Raise --max_image_side or --max_prompt_length, "
            "or check the image column."
        )
    ds = ds.cast_column("image", datasets.Image(decode=True))
    ds = ds.map(lambda problem: {"prompt": make_prompt(problem, system_prompt)}, input_columns="problem")
    return ds, stats


def split_train_eval(ds, eval_fraction: float, seed: int):
    """(train, held-out eval); the same seed gives the same split, so evaluation can rebuild it."""
    if eval_fraction <= 0:
        return ds, None
    n_eval = max(1, math.floor(len(ds) * eval_fraction))
    if n_eval >= len(ds):
        raise DatasetError(f"eval_fraction={eval_fraction} leaves no training rows out of {len(ds)}: lower it")
    split = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]
