#!/usr/bin/env python
"""Write a parquet file shaped like `lmms-lab/multimodal-open-r1-8k-verified` at its real scale, offline.

    python scripts/make_scale_parquet.py outputs/scale/train.parquet             # 7,700 rows, 758 MB, ~1.5 min
    python scripts/make_scale_parquet.py outputs/scale/small.parquet --rows 50

What it is for: measuring data preparation (time, memory, rows kept) at the size users train on, without the hub.
Same columns as the hub dataset (`image` as {bytes, path} with its `datasets` Image feature, `problem`, `solution`,
`original_question`, `original_answer`), JPEG images whose width and height are each uniform in 200-1000 px (85 % of
them then exceed the default --max_image_side 512 on some side), with content built to compress like photos: a
smooth random colour field (scene-sized structures) plus grain, ~98 KB per image at quality 90 (at 600x600, the
median size, pure noise takes 325 KB and a flat colour 6 KB). Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

WORDS = (
    "triangle circle angle radius chord tangent area perimeter bar chart value table figure shown line segment "
    "point midpoint parallel degrees length width height total price cost percent ratio year students number"
).split()


def photo_like_jpeg(rng, width: int, height: int, quality: int = 90) -> bytes:
    import numpy as np
    from PIL import Image

    # A coarse random colour grid upscaled bicubically gives smooth regions and edges like a scene; the gaussian
    # grain adds the high-frequency detail a camera sensor would. Blend weights tuned for ~2 bits per pixel.
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(128, 18, (height, width)).clip(0, 255).astype(np.uint8)
    image = Image.blend(image, Image.fromarray(grain).convert("RGB"), 0.25)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def text_row(rng, i: int) -> dict:
    """A question of 15-120 words and a gold answer in the hub dataset's `<think>...</think><answer>` form."""
    question = " ".join(rng.choice(WORDS, size=int(rng.integers(15, 121)))).capitalize()
    question = f"{question}? What is the value for item {i}?"
    answer = str(int(rng.integers(0, 1000)))
    return {
        "problem": question,
        "solution": f"<think>Reading the figure step by step gives {answer}.</think>\n\n<answer>{answer}</answer>",
        "original_question": question,
        "original_answer": answer,
    }


def write(out: Path, rows: int, seed: int = 0, min_side: int = 200, max_side: int = 1000, batch: int = 256) -> dict:
    """Write `rows` rows to `out` in row groups of `batch` (memory stays at one batch); returns a summary."""
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "problem": datasets.Value("string"),
            "solution": datasets.Value("string"),
            "original_question": datasets.Value("string"),
            "original_answer": datasets.Value("string"),
        }
    )
    schema = features.arrow_schema  # carries the `huggingface` metadata, so `datasets` reads `image` as an Image
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    total_bytes, over_512 = 0, 0
    with pq.ParquetWriter(str(out), schema) as writer:
        for start in range(0, rows, batch):
            cols = {name: [] for name in features}
            for i in range(start, min(rows, start + batch)):
                width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
                data = photo_like_jpeg(rng, width, height)
                total_bytes += len(data)
                over_512 += max(width, height) > 512
                cols["image"].append({"bytes": data, "path": None})
                for key, value in text_row(rng, i).items():
                    cols[key].append(value)
            writer.write_table(pa.Table.from_pydict(cols, schema=schema))
    return {"rows": rows, "image_bytes": total_bytes, "file_bytes": out.stat().st_size, "longer_side_over_512": over_512}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="parquet file to write (keep it under outputs/: it is not committed)")
    parser.add_argument("--rows", type=int, default=7700, help="rows (the hub dataset has ~7,700 after filtering)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sizes, colours and texts")
    args = parser.parse_args()
    if args.rows < 1:
        parser.error(f"--rows must be >= 1, got {args.rows}")
    print(write(args.out, args.rows, args.seed))


if __name__ == "__main__":
    main()
