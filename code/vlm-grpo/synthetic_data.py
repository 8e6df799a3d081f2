"""`--dataset_name synthetic`: a built-in, deterministic, offline visual QA dataset with verifiable answers.

Two tasks, drawn with Pillow (no download, no font files):
- counting: "How many red circles are in the image?" over a canvas of coloured circles, squares and triangles;
- reading: "What number is written in the image?" over a rendered 1-4 digit number.

`--dataset_name grounding` (`make_grounding_dataset`) is a third: "Where is the red circle? Answer with its box
[x1, y1, x2, y2] in pixels" over a canvas of a few shapes, each colour and shape once, scored by the `iou` reward.

Rows have the columns of `lmms-lab/multimodal-open-r1-8k-verified` (`image`, `problem`, `solution`,
`original_question`, `original_answer`) with the gold in the same `<think>…</think>\n\n<answer>…</answer>` form,
so every code path (loading, filtering, rewards) is the one the real dataset takes.
"""

from __future__ import annotations

import random

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=color)


def counting_example(rng: random.Random, side: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    target_color, target_shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    cell = side // 4  # a 4x4 grid: shapes never overlap, so the count is unambiguous
    cells = rng.sample(range(16), rng.randint(3, 9))
    count = 0
    for idx in cells:
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        count += (color, shape) == (target_color, target_shape)
        r, c = divmod(idx, 4)
        pad = cell // 6
        _draw_shape(draw, shape, (c * cell + pad, r * cell + pad, (c + 1) * cell - pad, (r + 1) * cell - pad), COLORS[color])
    problem = f"How many {target_color} {target_shape}s are in the image? Answer with a number."
    think = f"I look at every shape and count the {target_color} {target_shape}s: there are {count}."
    return image, problem, think, str(count)


def reading_example(rng: random.Random, side: int):
    from PIL import Image, ImageDraw, ImageFont

    number = rng.randint(0, 9999)
    image = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=side // 4)
    draw.text((side // 8, side // 3), str(number), fill=(0, 0, 0), font=font)
    problem = "What number is written in the image? Answer with a number."
    think = f"The image shows the digits {' '.join(str(number))}, which read {number}."
    return image, problem, think, str(number)


def make_synthetic_rows(num_rows: int, seed: int = 0, image_side: int = 112) -> dict[str, list]:
    """Columns of `num_rows` examples; the same seed gives the same rows, image bytes included."""
    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("image", "problem", "solution", "original_question", "original_answer")}
    for i in range(num_rows):
        image, problem, think, answer = (counting_example if i % 2 == 0 else reading_example)(rng, image_side)
        rows["image"].append(image)
        rows["problem"].append(problem)
        rows["solution"].append(f"<think>{think}</think>\n\n<answer>{answer}</answer>")
        rows["original_question"].append(problem)
        rows["original_answer"].append(answer)
    return rows


def make_synthetic_dataset(num_rows: int = 256, seed: int = 0, image_side: int = 112):
    """A `datasets.Dataset` with an `Image` feature, as `load_dataset` returns for the hub dataset."""
    from datasets import Dataset, Features, Image, Value

    features = Features(
        {
            "image": Image(),
            "problem": Value("string"),
            "solution": Value("string"),
            "original_question": Value("string"),
            "original_answer": Value("string"),
        }
    )
    return Dataset.from_dict(make_synthetic_rows(num_rows, seed, image_side), features=features)


GROUNDING_PROBLEM = "Where is the {color} {shape}? Answer with its box [x1, y1, x2, y2] in pixels."


def grounding_example(rng: random.Random, side: int):
    """A canvas of 2-4 shapes (no colour-shape pair twice, so the question has one answer) and the box of one.
    The box is in pixels of this image: the shape's bounding box, x2/y2 exclusive."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cell = side // 2  # a 2x2 grid: boxes never overlap
    pairs = rng.sample([(c, s) for c in sorted(COLORS) for s in SHAPES], rng.randint(2, 4))
    boxes = []
    for idx, (color, shape) in zip(rng.sample(range(4), len(pairs)), pairs):
        r, c = divmod(idx, 2)
        size = rng.randint(cell // 2, cell - 4)
        x0, y0 = c * cell + rng.randint(0, cell - size), r * cell + rng.randint(0, cell - size)
        box = (x0, y0, x0 + size, y0 + size)
        _draw_shape(draw, shape, (x0, y0, x0 + size - 1, y0 + size - 1), COLORS[color])
        boxes.append(box)
    target = rng.randrange(len(pairs))
    (color, shape), box = pairs[target], boxes[target]
    problem = GROUNDING_PROBLEM.format(color=color, shape=shape)
    think = f"The {color} {shape} spans x {box[0]} to {box[2]} and y {box[1]} to {box[3]}."
    return image, problem, think, f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]"


def make_grounding_dataset(num_rows: int = 256, seed: int = 0, image_side: int = 112):
    """`--dataset_name grounding`: the columns of `make_synthetic_dataset`, gold boxes in `<answer>`."""
    from datasets import Dataset, Features, Image, Value

    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("image", "problem", "solution", "original_question", "original_answer")}
    for _ in range(num_rows):
        image, problem, think, answer = grounding_example(rng, image_side)
        rows["image"].append(image)
        rows["problem"].append(problem)
        rows["solution"].append(f"<think>{think}</think>\n\n<answer>{answer}</answer>")
        rows["original_question"].append(problem)
        rows["original_answer"].append(answer)
    features = Features({k: Image() if k == "image" else Value("string") for k in rows})
    return Dataset.from_dict(rows, features=features)
