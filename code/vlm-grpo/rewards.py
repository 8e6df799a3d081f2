"""Reward functions for GRPO on visual question answering, in a name registry.

Each reward is a pure function with TRL's reward signature, `f(completions, **columns) -> list[float]`: one score per
completion, the dataset's columns (here `solution`) passed as keyword lists. They never raise on malformed
completions: a reward that crashes kills a multi-GPU job hours in, so every parse failure scores 0. What is not the
completion's fault is not a silent 0: a missing math-verify is an error (at `get_reward_funcs`, before any weights
load), and a math-verify timeout is logged, counted in `ACCURACY_EVENTS` and reported to TRL's `log_metric`.

Pick them by name: `--reward_funcs format accuracy` (the default). The system prompt below asks for exactly the
format `format_reward` checks and the answer forms `accuracy_reward` reads. Your own reward comes from a file or a
module, mixed with the names: `--reward_funcs format path/to/my_reward.py:score package.module:function`
(`get_reward_funcs`); `check_reward_funcs` calls each once on a dummy completion before any weights load.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import re
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question about the image, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here "
    "</answer>. Put only the final answer (a number, a word or a LaTeX expression) inside <answer> </answer>."
)

_FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_DIGIT_RE = re.compile(r"\d")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# A box, `[x1, y1, x2, y2]` in pixels: the grounding task's answer form (Qwen2.5-VL's own grounding output).
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def completion_text(completion) -> str:
    """The generated text of one completion, conversational (`[{"role": "assistant", "content": ...}]`) or plain."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else completion[-1]
        if isinstance(content, list):  # structured content blocks
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content if isinstance(content, str) else ""
    return ""


def extract_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}`, with nested braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_gold(solution: str) -> str:
    """The gold answer of a dataset row: the `<answer>` content of `<think>…</think><answer>…</answer>` (the
    multimodal-open-r1 format, where math-verify alone finds nothing: trl#3903), else a `\\boxed{}`, else the text."""
    solution = solution or ""
    tagged = _ANSWER_RE.findall(solution)
    if tagged:
        return tagged[-1].strip()
    return (extract_boxed(solution) or solution).strip()


def extract_prediction(text: str) -> str | None:
    r"""The model's answer: the last `<answer>` block (a `\boxed{}` inside it wins), else the last `\boxed{}`,
    else the last number in the text; None where there is nothing to grade."""
    tagged = _ANSWER_RE.findall(text)
    if tagged:
        inner = tagged[-1]
        return (extract_boxed(inner) or inner).strip()
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def _normalize(answer: str) -> str:
    answer = answer.strip().strip("$").strip().rstrip(".").strip()
    answer = re.sub(r"\\text\{(.*?)\}", r"\1", answer)
    return re.sub(r"\s+", " ", answer).lower()


def _as_number(answer: str) -> float | None:
    text = _normalize(answer).rstrip(",").rstrip("%")  # "5," from "I count 5, so ..."
    if "," in text:
        # Only thousands separators ("1,234"): "1,2,3" is a list and "1,5" may be a decimal comma, neither 123 nor 15.
        if not _THOUSANDS_RE.match(text):
            return None
        text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


# Seconds math-verify may spend parsing or comparing one answer (its own default); it enforces them with SIGALRM.
MATH_VERIFY_TIMEOUT_S = 5
# Answers the accuracy reward could not grade, since the process started: {"timeout": n}. A timeout scores 0.0 like a
# wrong answer, so the count is the only trace of how many "wrong" answers were never checked.
ACCURACY_EVENTS: Counter = Counter()
_THREAD_WARNING_SHOWN = False


class MathVerifyTimeout(Exception):
    """math-verify ran out of time on an answer."""


def _math_verify():
    try:
        import math_verify
    except ImportError as err:  # a missing requirement must not grade every LaTeX answer 0 for a whole run
        raise ImportError(
            "the accuracy reward needs math-verify (pinned in code/vlm-grpo/requirements.txt): "
            "pip install -r code/vlm-grpo/requirements.txt"
        ) from err
    return math_verify


def _timeout_here() -> int | None:
    """math-verify's timeout is a SIGALRM, which only the main thread may set: anywhere else it raises ValueError,
    which used to turn every LaTeX comparison into 0. Off the main thread, compare without a time limit."""
    global _THREAD_WARNING_SHOWN
    if threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_TIMEOUT_S
    if not _THREAD_WARNING_SHOWN:
        logger.warning("accuracy reward called outside the main thread: math-verify runs without its timeout")
        _THREAD_WARNING_SHOWN = True
    return None


def _latex_equal(prediction: str, gold: str) -> bool:
    """math-verify's verdict; raises MathVerifyTimeout when it ran out of time. Malformed LaTeX (a model's
    unbalanced braces, say) cannot be verified and is False."""
    mv = _math_verify()
    from math_verify.errors import TimeoutException  # a BaseException: no `except Exception` catches it

    timeout = _timeout_here()

    def parse(text: str) -> list:
        for candidate in (f"${text}$", text):
            try:
                parsed = mv.parse(candidate, parsing_timeout=timeout, raise_on_error=True)
            except Exception:  # noqa: BLE001 - math-verify raises on some malformed LaTeX
                parsed = []
            if parsed:
                return parsed
        return []

    try:
        gold_parsed, pred_parsed = parse(gold), parse(prediction)
        if not (gold_parsed and pred_parsed):
            return False
        try:
            return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=timeout, raise_on_error=True))
        except Exception:  # noqa: BLE001 - e.g. sympy failing on an exotic expression: not verified equal
            return False
    except TimeoutException as err:
        raise MathVerifyTimeout(f"math-verify timed out comparing {prediction[:80]!r} with {gold[:80]!r}") from err


def answers_match(prediction: str, gold: str) -> bool:
    """Numbers compare numerically, LaTeX through math-verify, anything else as normalized text. Raises
    MathVerifyTimeout when math-verify runs out of time, ImportError without math-verify."""
    if _normalize(prediction) == _normalize(gold):
        return True
    pred_num, gold_num = _as_number(prediction), _as_number(gold)
    if pred_num is not None and gold_num is not None:
        return abs(pred_num - gold_num) <= 1e-6 * max(1.0, abs(gold_num))
    return _latex_equal(prediction, gold)


# ---- rewards ------------------------------------------------------------------------------------------------


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion is exactly `<think>…</think><answer>…</answer>`, else 0.0."""
    return [1.0 if _FORMAT_RE.match(completion_text(c)) else 0.0 for c in completions]


def accuracy_reward(completions, solution, log_metric=None, **kwargs) -> list[float]:
    """1.0 when the completion's answer equals the gold answer in the dataset's `solution` column, else 0.0.

    An answer math-verify timed out on scores 0.0 and is counted: a warning per batch, ACCURACY_EVENTS["timeout"],
    and TRL's `log_metric` (passed by GRPOTrainer) as `accuracy/timeouts`, the batch's count."""
    rewards, timeouts = [], 0
    for completion, sol in zip(completions, solution, strict=True):
        prediction = extract_prediction(completion_text(completion))
        try:
            right = prediction is not None and answers_match(prediction, extract_gold(sol))
        except MathVerifyTimeout as err:
            timeouts += 1
            logger.debug("%s", err)
            right = False
        rewards.append(1.0 if right else 0.0)
    if timeouts:
        ACCURACY_EVENTS["timeout"] += timeouts
        logger.warning(
            "accuracy reward: math-verify timed out on %d of %d answers (scored 0.0; %d since start)",
            timeouts, len(rewards), ACCURACY_EVENTS["timeout"],
        )
    if log_metric is not None:
        # every batch, 0 included: TRL gathers each logged metric across processes by name, so a name logged on some
        # ranks only would leave the others waiting in the gather
        log_metric("accuracy/timeouts", float(timeouts))
    return rewards


def tag_count_reward(completions, **kwargs) -> list[float]:
    """0.25 per well-placed tag (`<think>`, `</think>`, `<answer>`, `</answer>`, each once): a dense version of
    `format_reward` that gives partial credit, so a weak model gets a learning signal before it masters the format."""
    rewards = []
    for c in completions:
        text = completion_text(c)
        rewards.append(sum(0.25 for tag in ("<think>", "</think>", "<answer>", "</answer>") if text.count(tag) == 1))
    return rewards


def digit_ratio_reward(completions, **kwargs) -> list[float]:
    """Fraction of non-space characters that are digits. Not a task reward: a dense signal with variance even for
    a random-weights model, used by the learning tests and the offline demo to prove advantages, loss and LoRA
    updates move the policy."""
    rewards = []
    for c in completions:
        chars = "".join(completion_text(c).split())
        rewards.append(len(_DIGIT_RE.findall(chars)) / len(chars) if chars else 0.0)
    return rewards


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """The last `[x1, y1, x2, y2]` of `text`, or None."""
    boxes = BOX_RE.findall(text or "")
    return tuple(float(v) for v in boxes[-1]) if boxes else None


def box_iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when either is degenerate (no area)."""
    if a is None or b is None or a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou_reward(completions, solution, image_sizes=None, model_image_sizes=None, **kwargs) -> list[float]:
    """IoU of the last box in the completion's last `<answer>` with the gold box of `solution`'s `<answer>`.

    Frames: the gold box is in pixels of the row's (first) image as stored, after any downscaling (data.py scales
    the gold box with its image). Qwen2.5-VL states boxes in absolute pixels of the image it sees, the processor's
    resize of that image to multiples of 28 (`model_image_sizes`; Qwen2-VL and Qwen3-VL state boxes on a relative
    0..1000 scale instead: families.py refuses this reward for them); the predicted box is scaled from that frame to
    the stored one (`image_sizes`) before the IoU. Rows without those columns (a dataset built elsewhere) compare the
    boxes as they are. 0.0 for no `<answer>`, no box, a degenerate box (x2 <= x1 or y2 <= y1) or no gold box."""
    n = len(completions)
    image_sizes, model_image_sizes = image_sizes or [None] * n, model_image_sizes or [None] * n
    rewards = []
    for completion, sol, stored, seen in zip(completions, solution, image_sizes, model_image_sizes, strict=True):
        tagged = _ANSWER_RE.findall(completion_text(completion))
        pred = parse_box(tagged[-1]) if tagged else None
        gold = parse_box(extract_gold(sol))
        if pred is not None and stored and seen:
            (w, h), (mw, mh) = stored[0], seen[0]
            pred = (pred[0] * w / mw, pred[1] * h / mh, pred[2] * w / mw, pred[3] * h / mh)
        rewards.append(box_iou(pred, gold))
    return rewards


REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "tag_count": tag_count_reward,
    "digit_ratio": digit_ratio_reward,
    "iou": iou_reward,
}


# Modules a reward imports when it runs, by reward name.
REWARD_REQUIREMENTS = {"accuracy": ("math_verify",)}


class RewardError(ValueError):
    """A reward that cannot be used: the message names it, says what is wrong and how to fix it."""


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def get_reward_funcs(specs: list[str]) -> list[Callable[..., list[float]]]:
    """Reward functions by registry name, `path/to/file.py:function` or `package.module:function`, in order.

    A file is imported as a module of its own (relative paths from the working directory); a module is imported from
    the installed packages or the working directory. Raises RewardError, one line naming the reward, for an unknown
    name, a missing file, a failed import, a missing function or one without TRL's reward signature."""
    funcs = [_load_reward(spec) for spec in specs]
    names = [s for s in specs if s in REWARD_FUNCS]
    missing = [f"{n} needs {m}" for n in names for m in REWARD_REQUIREMENTS.get(n, ()) if not _importable(m)]
    if missing:  # here, before the model loads, rather than at the first reward hours later
        raise RewardError(f"reward function requirements missing: {', '.join(missing)}; "
                          "pip install -r code/vlm-grpo/requirements.txt")
    return funcs


def _load_reward(spec: str) -> Callable[..., list[float]]:
    if spec in REWARD_FUNCS:
        return REWARD_FUNCS[spec]
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise RewardError(f"unknown reward function {spec!r} (--reward_funcs): choose from {sorted(REWARD_FUNCS)}, "
                          "or name your own as path/to/file.py:function or package.module:function")
    if where.endswith(".py") or "/" in where or os.sep in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise RewardError(f"--reward_funcs {spec}: no file {path.absolute()}")
        # one module per file, named after its resolved path: two files called rewards.py do not collide
        module_name = f"vlm_grpo_reward_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
        try:
            module = sys.modules.get(module_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[module_name] = module
                loader_spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - whatever the user's file raises, it is one line naming the file
            sys.modules.pop(module_name, None)
            raise RewardError(f"--reward_funcs {spec}: importing {path} failed: {type(err).__name__}: {err}") from err
        source = str(path)
    else:
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # a package of the repository the job cloned, run from its root
        try:
            module = importlib.import_module(where)
        except Exception as err:  # noqa: BLE001
            raise RewardError(f"--reward_funcs {spec}: importing module {where} failed: {type(err).__name__}: "
                              f"{err}") from err
        source = f"module {where}"
    func = getattr(module, name, None)
    if not callable(func):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise RewardError(f"--reward_funcs {spec}: {source} has no function {name!r} (its functions: {defined})")
    _check_signature(func, spec)
    return func


def _check_signature(func, spec: str) -> None:
    """TRL calls `func(prompts=..., completions=..., completion_ids=..., <every dataset column>=..., trainer_state=...,
    log_extra=..., log_metric=...)`, all by keyword: the function must take `completions` and `**kwargs`."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return  # a builtin or C callable: the dummy call (check_reward_funcs) is the check
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "completions" not in params or not takes_kwargs:
        raise RewardError(
            f"--reward_funcs {spec}: {getattr(func, '__name__', func)}{inspect.signature(func)} does not have TRL's "
            "reward signature: write it as `def f(completions, **kwargs) -> list[float]` (dataset columns arrive "
            "as keyword lists, e.g. `def f(completions, solution, **kwargs)`)"
        )


DUMMY_COMPLETION = [{"role": "assistant", "content": "<think>dummy</think><answer>0</answer>"}]


def check_reward_funcs(specs: list[str], funcs: list[Callable], row: dict) -> None:
    """Call each reward once, as TRL will, on a dummy completion for `row` (one prepared dataset row, every column):
    a reward that raises, asks for a column the data lacks, or returns other than one number (or None) per
    completion is a RewardError naming it, before any weights load."""
    columns = {k: [v] for k, v in row.items() if k not in ("prompt", "completion", "completion_ids")}
    for spec, func in zip(specs, funcs, strict=True):
        kwargs = dict(prompts=[row.get("prompt")], completions=[DUMMY_COMPLETION], completion_ids=[[0]], **columns,
                      trainer_state=None, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
        try:
            scores = func(**kwargs)
        except Exception as err:  # noqa: BLE001
            raise RewardError(f"--reward_funcs {spec}: calling it on a dummy completion raised {type(err).__name__}: "
                              f"{err} (the dataset's columns: {sorted(columns)})") from err
        if not isinstance(scores, (list, tuple)) or len(scores) != 1:
            got = f"{len(scores)} scores" if isinstance(scores, (list, tuple)) else type(scores).__name__
            raise RewardError(f"--reward_funcs {spec}: returned {got} for 1 completion: return a list with one "
                              "float (or None) per completion")
        score = scores[0]
        if score is not None and not (isinstance(score, numbers.Real) and math.isfinite(score)):
            raise RewardError(f"--reward_funcs {spec}: returned {score!r}: each score must be a finite float "
                              "(or None where the reward does not apply)")
