"""Dataset loading and hygiene for GRPO on images: every row that reaches the trainer can be decoded, is RGB, is
small enough (downscaled to `max_image_side`, or dropped with `image_policy="drop"`), fits `max_prompt_length` with
its image tokens, and has a gold answer. `survey_dataset` is the dry run's cheap look at a whole dataset.

Sources (`--dataset_name`): a hub id (default `lmms-lab/multimodal-open-r1-8k-verified`), a local parquet file or
folder of them, a `Dataset.save_to_disk` folder, a jsonl file whose image column holds paths (relative to the
file), or `synthetic` / `grounding` (synthetic_data.py). Each row needs an image column, a question and a gold answer:
`image`, `problem` and `solution` unless `Columns` (--image_column, --problem_column, --solution_column) names others.

One row shape after loading, whatever the source (`load_raw_dataset`): the question in `problem`, the gold in
`solution` (copies when the source names them otherwise: the source's own columns stay, so a reward can read them by
their names too), and the images either in `image` (one image a row) or, when the image column holds lists (hub
`Sequence(Image)`, parquet list of `{bytes, path}`, jsonl list of paths), in `images` (a list a row). TRL's
GRPOTrainer reads both columns (`images` first) and puts one image placeholder per image, in order, before the question.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from families import image_geometry
from rewards import BOX_RE, SYSTEM_PROMPT

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "problem", "solution")
IMAGE, IMAGES = "image", "images"  # the canonical image column: one image a row, or a list a row
SYNTHETIC = "synthetic"
GROUNDING = "grounding"
IMAGE_POLICIES = ("downscale", "drop")
# Qwen2.5-VL's resize (transformers' qwen2_vl smart_resize) refuses images more elongated than this: the processor
# would raise in the middle of training, so such rows are dropped up front.
MAX_ASPECT_RATIO = 200


class DatasetError(ValueError):
    """Bad dataset input: the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Columns:
    """Where the source keeps each part of a row (--image_column, --problem_column, --solution_column)."""

    image: str = "image"
    problem: str = "problem"
    solution: str = "solution"


def data_columns(args) -> Columns:
    """--image_column, --problem_column, --solution_column of parsed arguments (defaults for a namespace without
    them)."""
    return Columns(*(getattr(args, f"{part}_column", part) for part in ("image", "problem", "solution")))


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


def load_raw_dataset(name: str, config: str | None = None, split: str = "train", synthetic_rows: int = 512, seed: int = 0,
                     columns: Columns = Columns()):
    """The rows of `name` (see module docstring), one split, before any filtering, in the one row shape: a missing
    column is a DatasetError naming the columns the data has."""
    return canonical_columns(_load_source(name, config, split, synthetic_rows, seed, columns.image), columns)


def _load_source(name, config, split, synthetic_rows, seed, image_column):
    import datasets

    if name in (SYNTHETIC, GROUNDING):
        from synthetic_data import make_grounding_dataset, make_synthetic_dataset

        make = make_synthetic_dataset if name == SYNTHETIC else make_grounding_dataset
        return make(synthetic_rows, seed=seed)

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
                return _load_jsonl(jsonl, image_column)
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
            f"--dataset_name {name!r} is neither a local path nor a hub id (owner/name), nor '{SYNTHETIC}' or "
            f"'{GROUNDING}'."
        )
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub's errors don't say which flag to change
        raise DatasetError(
            f"could not load hub dataset {name!r} (split {split!r}): {type(err).__name__}: {err}. Check the name, "
            "network access and HF_TOKEN, or pass a local path or `synthetic`."
        ) from err


def _load_jsonl(files: list[Path], image_column: str = IMAGE):
    """jsonl rows whose image column holds a path or a list of paths, relative paths resolved against the file's
    folder."""
    import datasets

    ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    feature = ds.features.get(image_column)
    base = files[0].parent

    def cell(p):
        p = Path(p) if p else None
        return {"bytes": None, "path": str(p if p is None or p.is_absolute() else base / p)}

    if feature == datasets.Value("string"):
        features = ds.features.copy()
        features[image_column] = datasets.Image(decode=False)
        ds = ds.map(lambda v: {image_column: cell(v)}, input_columns=image_column, features=features)
    elif _is_list(feature) and _inner(feature) == datasets.Value("string"):
        features = ds.features.copy()
        features[image_column] = datasets.List(datasets.Image(decode=False))
        ds = ds.map(lambda v: {image_column: [cell(p) for p in v or []]}, input_columns=image_column,
                    features=features)
    return ds


def _is_list(feature) -> bool:
    import datasets

    return isinstance(feature, (list, datasets.List, datasets.LargeList))


def _inner(feature):
    return feature[0] if isinstance(feature, list) else feature.feature


def canonical_columns(ds, columns: Columns = Columns()):
    """`ds` in the one row shape (module docstring): the question in `problem`, the gold in `solution`, the images
    in `image` or, for lists, `images`. Raises DatasetError naming the columns `ds` has when one is missing."""
    import datasets

    wanted = {"--image_column": columns.image, "--problem_column": columns.problem,
              "--solution_column": columns.solution}
    missing = [f"{name!r} ({flag})" for flag, name in wanted.items() if name not in ds.column_names]
    if missing:
        raise DatasetError(
            f"the dataset has no column {', '.join(missing)}; its columns are {ds.column_names}. Name yours with "
            "--image_column, --problem_column and --solution_column (the image column holds an image, a path in "
            "jsonl, or a list of them; the solution holds the gold answer, ideally "
            "`<think>...</think><answer>...</answer>`)."
        )
    multi = _is_list(ds.features[columns.image])
    image_name = IMAGES if multi else IMAGE
    # the other image name would be read by TRL (it prefers `images`): only the chosen column stays
    drop = [c for c in (IMAGE, IMAGES) if c in ds.column_names and c != columns.image]
    for canonical, source in (("problem", columns.problem), ("solution", columns.solution)):
        if source != canonical and canonical in ds.column_names:
            drop.append(canonical)  # replaced by the column the flag names
    if drop:
        ds = ds.remove_columns(drop)
    if columns.image != image_name:
        ds = ds.rename_column(columns.image, image_name)
    for canonical, source in (("problem", columns.problem), ("solution", columns.solution)):
        if source != canonical:
            ds = ds.add_column(canonical, ds[source], feature=ds.features[source])
    if multi and isinstance(_inner(ds.features[IMAGES]), datasets.Image):
        ds = ds.cast_column(IMAGES, datasets.List(datasets.Image(decode=False)))  # decode ourselves (prepare_dataset)
    return ds


def image_column(ds) -> str:
    """`images` when rows hold lists of images, else `image` (the one row shape)."""
    return IMAGES if IMAGES in ds.column_names else IMAGE


def max_images_per_row(ds) -> int:
    """The largest image count of a row (1 for one image a row), read from Arrow's list lengths: no image decoded."""
    if IMAGES not in ds.column_names:
        return 1
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.data.column(IMAGES))
    return int(pc.max(lengths).as_py() or 0)


def check_columns(ds) -> None:
    """`ds` (after `canonical_columns`) has an image column, `problem` and `solution`."""
    missing = [c for c in ("problem", "solution") if c not in ds.column_names]
    if IMAGE not in ds.column_names and IMAGES not in ds.column_names:
        missing.insert(0, IMAGE)
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


def model_image_size(width: int, height: int, image_processor) -> tuple[int, int]:
    """(width, height) of the image the model sees: the processor's resize (transformers' qwen2_vl smart_resize) to
    multiples of patch x merge (28 for Qwen2/2.5-VL, 32 for Qwen3-VL: families.image_geometry) within
    min/max_pixels. Qwen2.5-VL states boxes in pixels of this image."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    patch, merge, min_pixels, max_pixels = image_geometry(image_processor)
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def image_token_count(width: int, height: int, image_processor) -> int:
    """Tokens the model spends on one image: one per merged patch after the processor's resize."""
    w, h = model_image_size(width, height, image_processor)
    patch, merge, _, _ = image_geometry(image_processor)
    return (h // patch) * (w // patch) // (merge * merge)


def text_token_count(problem: str, processor, system_prompt: str = SYSTEM_PROMPT, num_images: int = 1) -> int:
    """Tokens of the prompt around its images: chat template and text, without the images' placeholder tokens. The
    images come before the question, one placeholder each, as TRL's prepare_multimodal_messages puts them."""
    messages = make_prompt(problem, system_prompt)
    messages[1] = {"role": "user", "content": [*[{"type": "image"}] * num_images, {"type": "text", "text": problem}]}
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) - num_images


def prompt_token_count(problem: str, width: int, height: int, processor, system_prompt: str = SYSTEM_PROMPT) -> int:
    """Tokenized length of the full prompt (chat template, image tokens included), without running the image
    processor: the template's single `<|image_pad|>` placeholder is replaced by `image_token_count` tokens."""
    return multi_image_prompt_token_count(problem, [(width, height)], processor, system_prompt)


def multi_image_prompt_token_count(problem: str, sizes: list[tuple[int, int]], processor,
                                   system_prompt: str = SYSTEM_PROMPT) -> int:
    """`prompt_token_count` for a prompt with one image of each (width, height) in `sizes`."""
    image_tokens = sum(image_token_count(w, h, processor.image_processor) for w, h in sizes)
    return text_token_count(problem, processor, system_prompt, len(sizes)) + image_tokens


_ANSWER_BLOCK_RE = re.compile(r"(<answer>)(.*?)(</answer>)", re.DOTALL)


def scale_gold_box(solution: str, sx: float, sy: float) -> str:
    """`solution` with the box of its `<answer>` (`[x1, y1, x2, y2]`, pixels of the image) scaled by (sx, sy):
    a gold box stays on the object when its image is downscaled. A solution without a box is returned unchanged."""

    def scale(match):
        x1, y1, x2, y2 = (float(v) for v in match.groups())
        return f"[{round(x1 * sx)}, {round(y1 * sy)}, {round(x2 * sx)}, {round(y2 * sy)}]"

    def in_answer(block):
        return block.group(1) + BOX_RE.sub(scale, block.group(2)) + block.group(3)

    return _ANSWER_BLOCK_RE.sub(in_answer, solution)


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
    """Filter and convert rows; returns (dataset with `prompt`, `image` or `images`, `solution`, ..., FilterStats).

    `ds` is in the one row shape (`load_raw_dataset`; `canonical_columns` for a dataset built elsewhere). Every image
    of a row goes through the same rules: an image with a side over `max_image_side` is downscaled to fit, aspect
    ratio kept (`image_policy="downscale"`), or its row dropped (`"drop"`): Qwen2/2.5-VL spend one token per 28x28
    pixels, Qwen3-VL one per 32x32, so big images blow memory and vLLM's batch budget (trl#3788). The stored image is
    the downscaled one, so the trainer's processor and vLLM see the same pixels and count the same tokens; a gold box in the `<answer>` of
    a one-image row (`[x1, y1, x2, y2]`, the grounding form) is scaled with its image. Each row gets `image_sizes`
    and `model_image_sizes`, [width, height] per image as stored and as the model sees it (the processor's resize),
    so a reward can move a box between the two frames (rewards.iou_reward). Dropped, with counts: empty
    problem/solution, a missing or undecodable image (one is enough to drop the row), prompts (counted at the
    stored images' sizes, all of a row's image tokens included) over `max_prompt_length` tokens, and with `"drop"`
    images over `max_image_side`. A row whose image list is empty is an error. Kept images are RGB. The caller logs
    `stats.summary()`.
    """
    import datasets

    check_image_policy(image_policy)
    check_columns(ds)
    stats = FilterStats(total=len(ds), max_image_side=max_image_side)
    column = image_column(ds)
    multi = column == IMAGES
    cell_feature = datasets.Image(decode=False)
    if not multi and isinstance(ds.features[IMAGE], datasets.Image):
        ds = ds.cast_column(IMAGE, cell_feature)  # decode ourselves, so bad bytes can't crash
    if multi and isinstance(_inner(ds.features[IMAGES]), datasets.Image):
        ds = ds.cast_column(IMAGES, datasets.List(cell_feature))
    downscale = image_policy == "downscale"

    def _one_image(raw):
        """(cell to store, size, source size) or the reason the row is dropped."""
        image = _open_image(raw)
        if image is None:
            return "missing image"
        source_format, source_size = image.format, image.size
        if max(source_size) / max(1, min(source_size)) > MAX_ASPECT_RATIO:
            return f"image aspect ratio > {MAX_ASPECT_RATIO}"
        if max_image_side and max(source_size) > max_image_side and not downscale:
            return f"image side > max_image_side={max_image_side}"  # known from the header
        image = _decode(image, max_image_side if downscale else None)
        if image.size != source_size or image.mode != "RGB" or not isinstance(raw, dict):
            raw = _encode(image.convert("RGB"), source_format)
        return raw, image.size, source_size

    def _inspect(row):
        skip = {column: [] if multi else None, "prompt_tokens": 0, "_downscaled": False, "solution": row["solution"],
                "image_sizes": [], "model_image_sizes": []}
        problem, solution = row["problem"], row["solution"]
        if not (isinstance(problem, str) and problem.strip() and isinstance(solution, str) and solution.strip()):
            return {**skip, "_drop": "empty problem or solution"}
        raws = row[column] if multi else [row[column]]
        if not raws:
            return {**skip, "_drop": EMPTY_IMAGE_LIST}
        cells, sizes, downscaled = [], [], False
        for raw in raws:
            try:
                out = _one_image(raw)
            except _image_errors() as err:
                logger.debug("undecodable image: %s", err)
                out = "undecodable image"
            if isinstance(out, str):
                return {**skip, "_drop": out}
            cell, size, source_size = out
            cells.append(cell)
            sizes.append(size)
            downscaled |= size != source_size
        if downscaled and not multi:
            solution = scale_gold_box(solution, sizes[0][0] / source_size[0], sizes[0][1] / source_size[1])
        n_tokens = multi_image_prompt_token_count(problem, sizes, processor, system_prompt)
        if max_prompt_length and n_tokens > max_prompt_length:
            return {**skip, "_drop": f"prompt > max_prompt_length={max_prompt_length} tokens", "prompt_tokens": n_tokens}
        return {"_drop": "", column: cells if multi else cells[0], "prompt_tokens": n_tokens,
                "_downscaled": downscaled, "solution": solution, "image_sizes": [list(size) for size in sizes],
                "model_image_sizes": [list(model_image_size(*size, processor.image_processor)) for size in sizes]}

    features = ds.features.copy()
    features[column] = datasets.List(cell_feature) if multi else cell_feature
    features["_drop"] = datasets.Value("string")
    features["prompt_tokens"] = datasets.Value("int32")
    features["_downscaled"] = datasets.Value("bool")
    # per image, (width, height) stored and as the model sees it: the frames a box reward converts between
    features["image_sizes"] = features["model_image_sizes"] = datasets.List(datasets.List(datasets.Value("int32")))
    ds = ds.map(_inspect, features=features, num_proc=num_proc, desc="checking rows")
    drops = ds["_drop"]
    check_image_lists(drops)
    stats.dropped.update(d for d in drops if d)
    ds = ds.filter(lambda drop: not drop, input_columns="_drop").remove_columns("_drop")
    stats.downscaled = sum(ds["_downscaled"])
    ds = ds.remove_columns("_downscaled")
    if len(ds) == 0:
        raise DatasetError(
            f"no rows left after filtering: {stats.summary()}. Raise --max_prompt_length or --max_image_side "
            "(or keep --image_policy downscale), or check the image column."
        )
    ds = ds.cast_column(column, datasets.List(datasets.Image(decode=True)) if multi else datasets.Image(decode=True))
    ds = ds.map(lambda problem: {"prompt": make_prompt(problem, system_prompt)}, input_columns="problem")
    return ds, stats


EMPTY_IMAGE_LIST = "empty image list"


def check_image_lists(reasons: list[str]) -> None:
    """An empty image list is a data bug, not a row to lose quietly: one line naming the first such row."""
    empty = [i for i, reason in enumerate(reasons) if reason == EMPTY_IMAGE_LIST]
    if empty:
        raise DatasetError(
            f"{len(empty)} row(s) have an empty image list (first: row {empty[0]}): give every row at least one "
            "image, or remove those rows."
        )


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
    seconds. Sizes are those `prepare_dataset` stores (`downscaled_size`), token counts those the processor produces
    (all of a row's images). An image whose header is fine but whose body is truncated counts as kept here;
    `prepare_dataset` drops it.
    """
    import datasets

    check_columns(ds)
    column = image_column(ds)
    multi = column == IMAGES
    if not multi and isinstance(ds.features[IMAGE], datasets.Image):
        ds = ds.cast_column(IMAGE, datasets.Image(decode=False))
    if multi and isinstance(_inner(ds.features[IMAGES]), datasets.Image):
        ds = ds.cast_column(IMAGES, datasets.List(datasets.Image(decode=False)))
    ds = ds.select_columns([column, "problem", "solution"])
    image_processor = processor.image_processor
    unusable: Counter = Counter()
    widths, heights, longer, counts = [], [], [], []
    tokens = {"original": [], "downscale": []}  # image tokens of a row, every readable row
    prompt = {"downscale": [], "drop": []}  # prompt tokens of the rows each policy keeps before the length filter
    longest = {"downscale": None, "drop": None}  # (tokens, images, image tokens, row) of each policy's longest
    empty_lists = []
    for batch_start, batch in _batches(ds):
        for i, (cell, problem, solution) in enumerate(zip(batch[column], batch["problem"], batch["solution"], strict=True)):
            if not (isinstance(problem, str) and problem.strip() and isinstance(solution, str) and solution.strip()):
                unusable["empty problem or solution"] += 1
                continue
            raws = cell if multi else [cell]
            if not raws:
                empty_lists.append(EMPTY_IMAGE_LIST)
                continue
            sizes, reason = [], None
            for raw in raws:
                try:
                    image = _open_image(raw)
                except _image_errors():
                    reason = "undecodable image"
                    break
                if image is None:
                    reason = "missing image"
                    break
                w, h = image.size
                if max(w, h) / max(1, min(w, h)) > MAX_ASPECT_RATIO:
                    reason = f"image aspect ratio > {MAX_ASPECT_RATIO}"
                    break
                sizes.append((w, h))
            if reason:
                unusable[reason] += 1
                continue
            counts.append(len(sizes))
            widths += [w for w, _ in sizes]
            heights += [h for _, h in sizes]
            longer += [max(w, h) for w, h in sizes]
            text = text_token_count(problem, processor, system_prompt, len(sizes))
            original = sum(image_token_count(w, h, image_processor) for w, h in sizes)
            shrunk = sum(image_token_count(*downscaled_size(w, h, max_image_side), image_processor) for w, h in sizes)
            tokens["original"].append(original)
            tokens["downscale"].append(shrunk)
            for policy, image_tokens in (("downscale", shrunk), ("drop", original)):
                if policy == "drop" and max_image_side and any(max(s) > max_image_side for s in sizes):
                    continue
                prompt[policy].append(text + image_tokens)
                if longest[policy] is None or text + image_tokens > longest[policy]["tokens"]:
                    longest[policy] = {"tokens": text + image_tokens, "images": len(sizes),
                                       "image_tokens": image_tokens, "row": batch_start + i}
    check_image_lists(empty_lists)
    over_length = {policy: sum(n > max_prompt_length for n in lengths) if max_prompt_length else 0
                   for policy, lengths in prompt.items()}
    return {
        "rows": len(ds),
        "max_image_side": max_image_side,
        "max_prompt_length": max_prompt_length,
        "unusable": dict(sorted(unusable.items())),
        "images_per_row": {"min": min(counts), "median": statistics.median_low(counts), "max": max(counts)}
        if counts else None,
        "image_width": percentiles(widths),
        "image_height": percentiles(heights),
        "image_longer_side": percentiles(longer),
        "over_max_image_side": sum(side > max_image_side for side in longer) if max_image_side else 0,
        "image_tokens": {name: percentiles(values) for name, values in tokens.items()},
        "prompt_tokens": {policy: percentiles(lengths) for policy, lengths in prompt.items()},
        "longest_prompt": longest,
        "over_max_prompt_length": over_length,
        "kept": {policy: len(lengths) - over_length[policy] for policy, lengths in prompt.items()},
    }


def _batches(ds, size: int = 256):
    start = 0
    for batch in ds.iter(batch_size=size):
        yield start, batch
        start += size


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
        "columns": vars(data_columns(script_args)),
        "train_source_indices": sorted(train_dataset[SOURCE_INDEX]),
        "held_out_source_indices": sorted(held_out[SOURCE_INDEX]) if held_out is not None else [],
    }


def write_split_record(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPLIT_RECORD).write_text(json.dumps(record))
