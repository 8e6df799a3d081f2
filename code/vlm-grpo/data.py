"""Dataset loading and hygiene for GRPO on images: every row that reaches the trainer can be decoded, is RGB, is
small enough (downscaled to `max_image_side`, or dropped with `image_policy="drop"`), fits `max_prompt_length` with
its image tokens, and has a gold answer. `survey_dataset` is the dry run's cheap look at a whole dataset.

Sources (`--dataset_name`): a hub id (default `lmms-lab/multimodal-open-r1-8k-verified`), a local parquet file or
folder of them, a `Dataset.save_to_disk` folder, a jsonl file whose `image` column holds paths (relative to the
file), or `synthetic` (synthetic_data.py). Each row needs `image`, `problem` and `solution`.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rewards import SYSTEM_PROMPT

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "problem", "solution")
SYNTHETIC = "synthetic"
IMAGE_POLICIES = ("downscale", "drop")
# Qwen2.5-VL's resize (transformers' qwen2_vl smart_resize) refuses images more elongated than this: the processor
# would raise in the middle of training, so such rows are dropped up front.
MAX_ASPECT_RATIO = 200


class DatasetError(ValueError):
    """Bad dataset input: the message says what is wrong and how to fix it."""


@dataclass
class FilterStats:
    """Rows seen and dropped per reason, logged once so users know what their data lost."""

    total: int = 0
    dropped: Counter = field(default_factory=Counter)
    source_rows: int = 0  # rows in the source, before --max_train_samples or a dry run's sample
    downscaled: int = 0  # kept rows whose image was shrunk to max_image_side
    max_image_side: int | None = None

    @property
    def kept(self) -> int:
        return self.total - sum(self.dropped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        shrunk = f", {self.downscaled} downscaled to max_image_side={self.max_image_side}" if self.downscaled else ""
        return f"kept {self.kept}/{self.total} rows{shrunk} (dropped: {reasons})"


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


def text_token_count(problem: str, processor, system_prompt: str = SYSTEM_PROMPT) -> int:
    """Tokens of the prompt around its image: chat template and text, without the image's placeholder token."""
    messages = make_prompt(problem, system_prompt)
    messages[1] = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem}]}
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1


def prompt_token_count(problem: str, width: int, height: int, processor, system_prompt: str = SYSTEM_PROMPT) -> int:
    """Tokenized length of the full prompt (chat template, image tokens included), without running the image
    processor: the template's single `<|image_pad|>` placeholder is replaced by `image_token_count` tokens."""
    return text_token_count(problem, processor, system_prompt) + image_token_count(width, height, processor.image_processor)


def downscaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) shrunk so the longer side is `max_side`, aspect ratio kept; unchanged if it already fits.

    The shorter side is scaled by the same factor and rounded up (integer arithmetic, no float error), so the result
    is never more elongated than the source: a source within MAX_ASPECT_RATIO stays within it."""
    longer = max(width, height)
    if not max_side or longer <= max_side:
        return width, height
    return -(-width * max_side // longer), -(-height * max_side // longer)  # ceil; the longer side comes out exact


def _open_image(raw):
    """The image of a dataset cell, opened lazily (header read, pixels not decoded yet), or None if there is none."""
    from PIL import Image

    if raw is None:
        return None
    if isinstance(raw, Image.Image):
        return raw
    if raw.get("bytes"):
        return Image.open(io.BytesIO(raw["bytes"]))
    if raw.get("path"):
        return Image.open(raw["path"])
    return None


def _image_errors() -> tuple:
    """What a broken or hostile image raises in Pillow; anything else is a bug and should surface."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode(image, max_side: int | None = None):
    """The pixels of a lazily opened `image`, downscaled to `downscaled_size(..., max_side)` if it does not fit.
    Raises one of `_image_errors()` if the image cannot be decoded."""
    from PIL import Image

    target = downscaled_size(*image.size, max_side)
    if target == image.size:
        image.load()
        return image
    if image.mode in ("1", "P"):
        image = image.convert("RGB")  # Pillow resizes these modes with NEAREST only: blocky
    # What Image.thumbnail does, at a size computed by downscaled_size (so the dry run predicts it exactly): a JPEG
    # decodes straight at 1/2, 1/4 or 1/8 scale while that stays >= 2x the target (a 4000x3000 photo shrinks ~2.4x
    # faster), then LANCZOS, with thumbnail's reducing_gap=2.0 (a cheap box reduction first, only for images over 4x
    # the target; Pillow calls 3.0 indistinguishable from a full LANCZOS in most cases, 2.0 is a little faster).
    image.draft(None, (2 * target[0], 2 * target[1]))
    return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _encode(image, source_format: str | None) -> dict:
    """A dataset image cell holding `image` (RGB). A JPEG source stays JPEG (quality 95, visually lossless: for a
    512x384 photo-like image ~1 ms and ~65 KB, where PNG took ~60 ms and ~300 KB); anything else, line art included,
    becomes PNG, lossless."""
    buf = io.BytesIO()
    if source_format in ("JPEG", "MPO"):  # MPO: a multi-picture JPEG from a camera, first frame kept
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def check_image_policy(image_policy: str) -> None:
    if image_policy not in IMAGE_POLICIES:
        raise DatasetError(f"--image_policy must be one of {list(IMAGE_POLICIES)}, got {image_policy!r}")


def prepare_dataset(
    ds,
    processor,
    max_image_side: int | None = 512,
    max_prompt_length: int | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    num_proc: int | None = None,
    image_policy: str = "downscale",
):
    """Filter and convert rows; returns (dataset with `prompt`, `image`, `solution`, ..., FilterStats).

    An image with a side over `max_image_side` is downscaled to fit, aspect ratio kept (`image_policy="downscale"`),
    or its row dropped (`"drop"`): Qwen2.5-VL spends one token per 28x28 pixels, so big images blow memory and
    vLLM's batch budget (trl#3788). The stored image is the downscaled one, so the trainer's processor and vLLM see
    the same pixels and count the same tokens. Dropped, with counts: empty problem/solution, missing or undecodable
    image, prompts (counted at the stored image's size) over `max_prompt_length` tokens, and with `"drop"` images
    over `max_image_side`. Kept images are RGB. The caller logs `stats.summary()`.
    """
    import datasets

    check_image_policy(image_policy)
    check_columns(ds)
    stats = FilterStats(total=len(ds), max_image_side=max_image_side)
    if isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))  # decode ourselves, so bad bytes can't crash
    downscale = image_policy == "downscale"

    def _inspect(row):
        skip = {"image": None, "prompt_tokens": 0, "_downscaled": False}
        problem, solution = row["problem"], row["solution"]
        if not (isinstance(problem, str) and problem.strip() and isinstance(solution, str) and solution.strip()):
            return {**skip, "_drop": "empty problem or solution"}
        try:
            image = _open_image(row["image"])
            if image is None:
                return {**skip, "_drop": "missing image"}
            source_format, source_size = image.format, image.size
            if max(source_size) / max(1, min(source_size)) > MAX_ASPECT_RATIO:
                return {**skip, "_drop": f"image aspect ratio > {MAX_ASPECT_RATIO}"}
            if max_image_side and max(source_size) > max_image_side and not downscale:
                return {**skip, "_drop": f"image side > max_image_side={max_image_side}"}  # known from the header
            image = _decode(image, max_image_side if downscale else None)
        except _image_errors() as err:
            logger.debug("undecodable image: %s", err)
            return {**skip, "_drop": "undecodable image"}
        width, height = image.size
        n_tokens = prompt_token_count(problem, width, height, processor, system_prompt)
        if max_prompt_length and n_tokens > max_prompt_length:
            return {**skip, "_drop": f"prompt > max_prompt_length={max_prompt_length} tokens", "prompt_tokens": n_tokens}
        raw, downscaled = row["image"], image.size != source_size
        if downscaled or image.mode != "RGB" or not isinstance(raw, dict):
            raw = _encode(image.convert("RGB"), source_format)
        return {"_drop": "", "image": raw, "prompt_tokens": n_tokens, "_downscaled": downscaled}

    features = ds.features.copy()
    features["image"] = datasets.Image(decode=False)
    features["_drop"] = datasets.Value("string")
    features["prompt_tokens"] = datasets.Value("int32")
    features["_downscaled"] = datasets.Value("bool")
    ds = ds.map(_inspect, features=features, num_proc=num_proc, desc="checking rows")
    stats.dropped.update(d for d in ds["_drop"] if d)
    ds = ds.filter(lambda drop: not drop, input_columns="_drop").remove_columns("_drop")
    stats.downscaled = sum(ds["_downscaled"])
    ds = ds.remove_columns("_downscaled")
    if len(ds) == 0:
        raise DatasetError(
            f"no rows left after filtering: {stats.summary()}. Raise --max_prompt_length or --max_image_side "
            "(or keep --image_policy downscale), or check the image column."
        )
    ds = ds.cast_column("image", datasets.Image(decode=True))
    ds = ds.map(lambda problem: {"prompt": make_prompt(problem, system_prompt)}, input_columns="problem")
    return ds, stats


def percentiles(values: list[int], points=(0, 10, 50, 90, 99, 100)) -> dict | None:
    """Nearest-rank percentiles (each one a value that occurs): {"min", "p10", ..., "max"}; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    names = {0: "min", 100: "max"}
    return {names.get(p, f"p{p}"): ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in points}


def survey_dataset(
    ds,
    processor,
    max_image_side: int | None = 512,
    max_prompt_length: int | None = None,
    system_prompt: str = SYSTEM_PROMPT,
) -> dict:
    """What `prepare_dataset` would make of every row of `ds`, under each image policy, from image headers only.

    Reads each image's size from its header (Pillow opens lazily; no pixels are decoded), so a whole dataset takes
    seconds. Sizes are those `prepare_dataset` stores (`downscaled_size`), token counts those the processor produces.
    An image whose header is fine but whose body is truncated counts as kept here; `prepare_dataset` drops it.
    """
    import datasets

    check_columns(ds)
    if isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    ds = ds.select_columns(list(REQUIRED_COLUMNS))
    image_processor = processor.image_processor
    unusable: Counter = Counter()
    widths, heights, longer = [], [], []
    tokens = {"original": [], "downscale": []}  # image tokens, every readable row
    prompt = {"downscale": [], "drop": []}  # prompt tokens of the rows each policy keeps before the length filter
    for batch in ds.iter(batch_size=256):
        for raw, problem, solution in zip(batch["image"], batch["problem"], batch["solution"], strict=True):
            if not (isinstance(problem, str) and problem.strip() and isinstance(solution, str) and solution.strip()):
                unusable["empty problem or solution"] += 1
                continue
            try:
                image = _open_image(raw)
            except _image_errors():
                unusable["undecodable image"] += 1
                continue
            if image is None:
                unusable["missing image"] += 1
                continue
            width, height = image.size
            if max(width, height) / max(1, min(width, height)) > MAX_ASPECT_RATIO:
                unusable[f"image aspect ratio > {MAX_ASPECT_RATIO}"] += 1
                continue
            widths.append(width)
            heights.append(height)
            longer.append(max(width, height))
            text = text_token_count(problem, processor, system_prompt)
            original = image_token_count(width, height, image_processor)
            shrunk = image_token_count(*downscaled_size(width, height, max_image_side), image_processor)
            tokens["original"].append(original)
            tokens["downscale"].append(shrunk)
            prompt["downscale"].append(text + shrunk)
            if not max_image_side or max(width, height) <= max_image_side:
                prompt["drop"].append(text + original)
    over_length = {policy: sum(n > max_prompt_length for n in lengths) if max_prompt_length else 0
                   for policy, lengths in prompt.items()}
    return {
        "rows": len(ds),
        "max_image_side": max_image_side,
        "max_prompt_length": max_prompt_length,
        "unusable": dict(sorted(unusable.items())),
        "image_width": percentiles(widths),
        "image_height": percentiles(heights),
        "image_longer_side": percentiles(longer),
        "over_max_image_side": sum(side > max_image_side for side in longer) if max_image_side else 0,
        "image_tokens": {name: percentiles(values) for name, values in tokens.items()},
        "prompt_tokens": {policy: percentiles(lengths) for policy, lengths in prompt.items()},
        "over_max_prompt_length": over_length,
        "kept": {policy: len(lengths) - over_length[policy] for policy, lengths in prompt.items()},
    }


def split_train_eval(ds, eval_fraction: float, seed: int):
    """(train, held-out eval); the same seed gives the same split, so evaluation can rebuild it."""
    if eval_fraction <= 0:
        return ds, None
    n_eval = max(1, math.floor(len(ds) * eval_fraction))
    if n_eval >= len(ds):
        raise DatasetError(f"eval_fraction={eval_fraction} leaves no training rows out of {len(ds)}: lower it")
    split = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]


# ---- the run's split, recorded ------------------------------------------------------------------------------

SOURCE_INDEX = "source_index"
SPLIT_RECORD = "split.json"


def split_record(script_args, training_args, train_dataset, held_out) -> dict:
    """Which source rows the run trained on and which it held out: evaluation reads this instead of re-deriving the
    split from arguments, so it can never score a training row (different filters shift a re-derived split)."""
    return {
        "dataset_name": script_args.dataset_name,
        "dataset_config": script_args.dataset_config,
        "dataset_train_split": script_args.dataset_train_split,
        "seed": training_args.seed,
        "eval_fraction": script_args.eval_fraction,
        "train_source_indices": sorted(train_dataset[SOURCE_INDEX]),
        "held_out_source_indices": sorted(held_out[SOURCE_INDEX]) if held_out is not None else [],
    }


def write_split_record(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPLIT_RECORD).write_text(json.dumps(record))
