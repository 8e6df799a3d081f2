"""code/vlm-grpo/rewards.py on rows shaped like lmms-lab/multimodal-open-r1-8k-verified and TRL's completions."""

from __future__ import annotations

import json
import re
import sys

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)

from _tiny import REPO

import rewards
from rewards import (
    REWARD_FUNCS,
    SYSTEM_PROMPT,
    accuracy_reward,
    digit_ratio_reward,
    format_reward,
    get_reward_funcs,
    tag_count_reward,
)


def gold(answer: str, think: str = "I look at the image and work it out.") -> str:
    """A `solution` cell in the dataset's own form."""
    return f"<think>{think}</think>\n\n<answer>{answer}</answer>"


def chat(text):
    """A conversational completion as GRPOTrainer passes it for a conversational prompt."""
    return [{"role": "assistant", "content": text}]


def both_shapes(text: str) -> list:
    return [chat(text), text]


# ---- accuracy ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("<think>three red circles</think><answer>3</answer>", "3"),
        ("<think>read it</think>\n<answer> 4071 </answer>", "4071"),
        ("<think>x</think><answer>\\frac{1}{2}</answer>", "0.5"),  # LaTeX vs decimal, through math-verify
        ("<think>x</think><answer>0.5</answer>", "\\frac{1}{2}"),
        ("<think>x</think><answer>$\\frac{\\sqrt{2}}{2}$</answer>", "\\frac{1}{\\sqrt{2}}"),
        ("<think>x</think><answer>1,234</answer>", "1234"),  # thousands separator
        ("<think>x</think><answer>1234</answer>", "1,234"),
        ("<think>x</think><answer>-1,234,567.5</answer>", "-1234567.5"),
        ("<think>x</think><answer>\\boxed{7}</answer>", "7"),  # \boxed inside <answer>
        ("The count is \\boxed{12}.", "12"),  # \boxed without tags
        ("<think>x</think><answer>Blue</answer>", "blue"),  # text, case-insensitive
        ("<think>x</think><answer>\\text{B}.</answer>", "B"),
        ("I count them: 2, then 5, so 9", "9"),  # last number, no tags
    ],
)
def test_accuracy_correct(completion, answer):
    assert accuracy_reward(both_shapes(completion), [gold(answer)] * 2) == [1.0, 1.0]


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("<think>x</think><answer>4</answer>", "3"),
        ("<think>x</think><answer>3</answer>", "30"),
        ("<think>x</think><answer>\\frac{1}{3}</answer>", "0.5"),
        ("<think>x</think><answer>red</answer>", "blue"),
        ("<think>x</think><answer>1,2,3</answer>", "123"),  # a list is not a number with separators
        ("<think>x</think><answer>1,5</answer>", "15"),
        # the answer inside <think> does not count: the last <answer> block is graded
        ("<think>maybe 3</think><answer>4</answer>", "3"),
        ("<think>x</think><answer></answer>", "3"),
        ("no numbers and no tags at all", "3"),
    ],
)
def test_accuracy_wrong(completion, answer):
    assert accuracy_reward(both_shapes(completion), [gold(answer)] * 2) == [0.0, 0.0]


def test_accuracy_reads_gold_inside_answer_tags_not_think():
    # fix ledger U2: math-verify alone reads nothing useful from `<think>…</think>\n\n<answer>…</answer>`;
    # numbers in the gold's reasoning must not be taken for the answer.
    solution = gold("5", think="There are 2 rows of 3 shapes minus 1, i.e. 6 - 1.")
    assert accuracy_reward([chat("<think>x</think><answer>5</answer>")], [solution]) == [1.0]
    assert accuracy_reward([chat("<think>x</think><answer>6</answer>")], [solution]) == [0.0]
    assert accuracy_reward([chat("<think>x</think><answer>1</answer>")], [solution]) == [0.0]


def test_accuracy_on_synthetic_rows_scores_only_the_true_answer():
    from synthetic_data import make_synthetic_rows

    rows = make_synthetic_rows(6, seed=3)
    right = [chat(f"<think>ok</think><answer>{a}</answer>") for a in rows["original_answer"]]
    wrong = [chat(f"<think>ok</think><answer>{int(a) + 1}</answer>") for a in rows["original_answer"]]
    assert accuracy_reward(right, rows["solution"]) == [1.0] * 6
    assert accuracy_reward(wrong, rows["solution"]) == [0.0] * 6


def test_boxed_and_answer_tags_agree():
    sol = [gold("\\frac{3}{4}")]
    assert accuracy_reward([chat("<think>x</think><answer>\\frac{3}{4}</answer>")], sol) == [1.0]
    assert accuracy_reward([chat("so \\boxed{\\frac{3}{4}}")], sol) == [1.0]
    assert accuracy_reward([chat("so \\boxed{0.75}")], sol) == [1.0]
    # a gold written as \boxed{} (other datasets) is read too
    assert accuracy_reward([chat("<think>x</think><answer>0.75</answer>")], ["\\boxed{\\frac{3}{4}}"]) == [1.0]
    # nested braces inside \boxed are balanced, not cut at the first `}`
    assert rewards.extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"


# ---- format ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>reasoning</think><answer>3</answer>", 1.0),
        ("<think>\nmulti\nline\n</think>\n\n<answer>\n3\n</answer>\n", 1.0),
        ("<think>reasoning</think>", 0.0),  # no answer
        ("<answer>3</answer>", 0.0),  # no reasoning
        ("<think>reasoning<answer>3</answer>", 0.0),  # unclosed think
        ("<think>reasoning</think><answer>3", 0.0),  # unclosed answer
        ("<answer>3</answer><think>reasoning</think>", 0.0),  # wrong order
        ("Sure! <think>r</think><answer>3</answer>", 0.0),  # text outside the tags
        ("<think>r</think><answer>3</answer> Hope this helps", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(both_shapes(completion)) == [expected, expected]


def test_system_prompt_asks_for_the_format_format_reward_checks():
    # The prompt's own example, filled in: a model that follows the prompt to the letter must score 1.
    example = re.search(r"<think>[^<]*\S[^<]*</think>\s*<answer>[^<]*\S[^<]*</answer>", SYSTEM_PROMPT)
    assert example, "SYSTEM_PROMPT should show an example `<think> ... </think><answer> ... </answer>`"
    completion = example.group(0).replace("reasoning process here", "I count 3 red circles").replace(
        "answer here", "3"
    )
    assert completion != example.group(0), "the example's placeholders changed: update this test"
    assert format_reward([chat(completion), completion]) == [1.0, 1.0]
    assert accuracy_reward([chat(completion)], [gold("3")]) == [1.0]
    # and the raw example, placeholders and all, is in the format too
    assert format_reward([example.group(0)]) == [1.0]


def test_tag_count_gives_partial_credit():
    assert tag_count_reward(both_shapes("<think>a</think><answer>b</answer>")) == [1.0, 1.0]
    assert tag_count_reward(["<think>a</think>"]) == [0.5]
    assert tag_count_reward(["<think>a</think><think>b</think><answer>c</answer>"]) == [0.5]  # duplicates don't count
    assert tag_count_reward(["plain"]) == [0.0]


def test_digit_ratio():
    assert digit_ratio_reward(["12ab"]) == [0.5]
    assert digit_ratio_reward([chat("1 2 3")]) == [1.0]
    assert digit_ratio_reward(["", "   "]) == [0.0, 0.0]


# ---- malformed completions: no reward ever raises ----------------------------------------------------------------

MALFORMED = [
    None,
    [],
    [{}],
    [{"role": "assistant", "content": None}],
    [{"role": "assistant", "content": [{"type": "image"}, "junk", 5]}],
    ["not a dict"],
    42,
    "<think>unclosed <answer>3",
    "<answer>\\frac{1}{</answer>",  # broken LaTeX
    "<answer>\\left( 1 \\right</answer>",
    "<answer>$$$</answer>",
    "<answer>}{}{\\boxed{</answer>",
    "\\boxed{" * 2000,
    "<think>" + "garbage " * 50_000,  # ~400 KB, no closing tags
    "<answer>" + "9" * 5000 + "</answer>",
    "\x00\ufffd<think>\udcff</think>",
]


@pytest.mark.parametrize("name", sorted(REWARD_FUNCS))
def test_rewards_never_raise_and_return_one_float_per_completion(name):
    func = REWARD_FUNCS[name]
    scores = func(MALFORMED, solution=[gold("3")] * len(MALFORMED))
    assert len(scores) == len(MALFORMED)
    assert all(isinstance(s, float | int) and 0.0 <= s <= 1.0 for s in scores), scores


def test_malformed_completions_score_zero_on_accuracy_and_format():
    # gold 17 appears in none of them; an unclosed tag with the right number still earns accuracy (last-number
    # fallback, below), so the gold here is one no malformed completion contains
    assert accuracy_reward(MALFORMED, [gold("17")] * len(MALFORMED)) == [0.0] * len(MALFORMED)
    assert format_reward(MALFORMED) == [0.0] * len(MALFORMED)


def test_unclosed_tags_fall_back_to_the_last_number():
    assert accuracy_reward([chat("<think>unclosed <answer>3")], [gold("3")]) == [1.0]
    assert format_reward([chat("<think>unclosed <answer>3")]) == [0.0]


def test_accuracy_grades_latex_outside_the_main_thread():
    """math-verify's timeout is a SIGALRM, which raises ValueError in a worker thread; that error used to be swallowed
    into a 0.0 for every LaTeX answer. A right LaTeX answer must score 1.0 and a wrong one 0.0 in a thread too."""
    import threading

    result = {}

    def score():
        try:
            result["scores"] = accuracy_reward(
                [chat("<think>x</think><answer>\\frac{1}{2}</answer>"), chat("<think>x</think><answer>\\frac{1}{3}</answer>")],
                [gold("0.5")] * 2,
            )
        except Exception as err:  # noqa: BLE001 - the assertion below reports it
            result["error"] = err

    worker = threading.Thread(target=score)
    worker.start()
    worker.join()
    assert "error" not in result, result.get("error")
    assert result["scores"] == [1.0, 0.0]


# Comparing (x+1)^2000 with (x+2)^2000 makes sympy expand both: over a minute (measured: ~1.2 s for the power 300),
# so with a 1 s limit math-verify times out on it on any machine.
SLOW_TO_VERIFY = "(x+2)^{2000}", "(x+1)^{2000}"


def test_accuracy_timeout_is_logged_and_counted():
    """In a fresh interpreter: math-verify's timeout is a SIGALRM in the main thread, and a suite that has already
    verified the same expression (sympy caches) or run other libraries in-process (vLLM's engine) can make the
    comparison return in time, which passed or failed this test depending on what ran before it."""
    code = f"""
import json, logging, sys
sys.path.insert(0, {str(REPO / 'code' / 'vlm-grpo')!r})
import rewards
logging.basicConfig(level=logging.WARNING, format="%(message)s")
rewards.MATH_VERIFY_TIMEOUT_S = 1
chat = lambda text: [{{"role": "assistant", "content": text}}]
gold = lambda answer: f"<think>reasoning</think>\\n\\n<answer>{{answer}}</answer>"
prediction, answer = {SLOW_TO_VERIFY!r}
metrics = []
scores = rewards.accuracy_reward(
    [chat(f"<think>x</think><answer>{{prediction}}</answer>"), chat("<think>x</think><answer>3</answer>")],
    [gold(answer), gold("3")], log_metric=lambda *m: metrics.append(m))
print(json.dumps({{"scores": scores, "timeouts": rewards.ACCURACY_EVENTS["timeout"], "metrics": metrics}}))
"""
    proc = _proc.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["scores"] == [0.0, 1.0]
    assert result["timeouts"] == 1
    assert result["metrics"] == [["accuracy/timeouts", 1.0]], "GRPOTrainer's log_metric gets the batch's count"
    assert "timed out on 1 of 2 answers" in proc.stderr


def test_accuracy_reports_zero_timeouts_to_the_trainer():
    metrics = []
    accuracy_reward([chat("<think>x</think><answer>3</answer>")], [gold("3")], log_metric=lambda *m: metrics.append(m))
    assert metrics == [("accuracy/timeouts", 0.0)]


def test_missing_math_verify_is_an_error_not_a_zero(monkeypatch):
    # None in sys.modules makes `import math_verify` raise ImportError, as on a machine without the package.
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match="math-verify"):
        accuracy_reward([chat("<think>x</think><answer>\\frac{1}{2}</answer>")], [gold("0.5")])
    # refused when the rewards are picked, before any model loads
    with pytest.raises(ValueError, match="accuracy needs math_verify"):
        get_reward_funcs(["format", "accuracy"])
    assert get_reward_funcs(["format"]) == [format_reward]


# Gold answers in the dataset's `solution` form, each with every form of the right answer the reward accepts and
# wrong answers that look close.
REAL_SHAPED_ROWS = [
    {
        "solution": "<think>The table lists 4071 visitors on Monday.</think>\n\n<answer>4071</answer>",
        "right": ["4071", " 4071 ", "$4071$", "\\boxed{4071}", "4,071", "4071.0", "4071."],
        "right_untagged": ["The answer is \\boxed{4071}.", "So Monday had 4071"],
        "wrong": ["4070", "407", "40710", "4,07,1"],
    },
    {
        "solution": "<think>Half of the circles are red: 3 of 6.</think>\n\n<answer>\\frac{1}{2}</answer>",
        "right": ["\\frac{1}{2}", "0.5", "$\\frac{1}{2}$", "\\boxed{\\frac{1}{2}}", "1/2", "\\dfrac{1}{2}"],
        "right_untagged": ["so \\boxed{0.5}"],
        "wrong": ["\\frac{1}{3}", "0.25", "2", "\\frac{2}{1}"],
    },
    {
        "solution": "<think>The diagonal of the unit square, by Pythagoras.</think>\n\n<answer>\\sqrt{2}</answer>",
        "right": ["\\sqrt{2}", "$\\sqrt{2}$", "\\boxed{\\sqrt{2}}", "2^{1/2}", "\\frac{2}{\\sqrt{2}}"],
        "right_untagged": ["the diagonal is \\boxed{\\sqrt{2}}"],
        "wrong": ["\\sqrt{3}", "2", "1.41", "\\frac{1}{\\sqrt{2}}"],
    },
    {
        "solution": "<think>Option B is the only triangle.</think>\n\n<answer>B</answer>",
        "right": ["B", "b", " B ", "\\text{B}", "B.", "$B$", "\\boxed{B}"],
        "right_untagged": ["\\boxed{B}"],
        "wrong": ["A", "C", "BB", "D"],
    },
]


@pytest.mark.parametrize("row", REAL_SHAPED_ROWS, ids=lambda r: r["solution"].split("<answer>")[1][:-9])
def test_accuracy_on_real_shaped_rows_every_accepted_form(row):
    tagged = [f"<think>I read the image.</think>\n<answer>{a}</answer>" for a in row["right"]]
    completions = [chat(c) for c in tagged + row["right_untagged"]]
    assert accuracy_reward(completions, [row["solution"]] * len(completions)) == [1.0] * len(completions)
    wrong = [chat(f"<think>I read the image.</think>\n<answer>{a}</answer>") for a in row["wrong"]]
    # the right answer in the reasoning does not count when the <answer> block says otherwise
    right_in_think = chat(f"<think>maybe {row['right'][0]}</think><answer>{row['wrong'][0]}</answer>")
    wrong.append(right_in_think)
    assert accuracy_reward(wrong, [row["solution"]] * len(wrong)) == [0.0] * len(wrong)


def test_the_last_answer_block_is_graded():
    completion = chat("<think>x</think><answer>4</answer> wait, recount: <answer>3</answer>")
    assert accuracy_reward([completion], [gold("3")]) == [1.0]
    assert accuracy_reward([completion], [gold("4")]) == [0.0]


def test_structured_content_blocks_are_read():
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "<think>a</think><answer>3</answer>"}]}]
    assert format_reward([completion]) == [1.0]
    assert accuracy_reward([completion], [gold("3")]) == [1.0]


def test_missing_or_empty_gold_scores_zero():
    completion = chat("<think>x</think><answer>3</answer>")
    assert accuracy_reward([completion, completion], [None, ""]) == [0.0, 0.0]


# ---- registry ------------------------------------------------------------------------------------------------


def test_registry_resolves_names_in_order():
    assert get_reward_funcs(["accuracy", "format"]) == [accuracy_reward, format_reward]
    assert set(REWARD_FUNCS) >= {"format", "accuracy", "tag_count", "digit_ratio"}


def test_registry_error_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_reward_funcs(["format", "acuracy"])
    message = str(err.value)
    assert "acuracy" in message
    for name in REWARD_FUNCS:
        assert name in message


# ---- iou (the grounding task) ----------------------------------------------------------------------------------


def box_answer(box: str) -> list[dict]:
    return [{"role": "assistant", "content": f"<think>there</think><answer>{box}</answer>"}]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("[10, 20, 50, 60]", 1.0),  # the gold box
        ("[10, 20, 30, 60]", 0.5),  # half of it
        ("[30, 20, 70, 60]", 1 / 3),  # shifted by half its width: 800 / 2400
        ("[60, 70, 90, 99]", 0.0),  # beside it
        ("the box is [0, 0, 5, 5] or rather [10, 20, 50, 60]", 1.0),  # the last box in the answer counts
        ("[10.0, 20.0, 50.0, 60.0]", 1.0),
        ("[ 10 ,20,50 , 60 ]", 1.0),
        ("[10, 20, 50]", 0.0),  # three numbers: malformed
        ("[10, 20, 50, 60", 0.0),  # unclosed
        ("(10, 20, 50, 60)", 0.0),  # not the bracket form
        ("[50, 20, 10, 60]", 0.0),  # x2 < x1: degenerate
        ("[10, 20, 10, 60]", 0.0),  # zero width
        ("", 0.0),
    ],
)
def test_iou_reward_on_literal_boxes(answer, expected):
    assert rewards.iou_reward([box_answer(answer)], solution=[gold("[10, 20, 50, 60]")]) == [pytest.approx(expected)]


def test_iou_reward_needs_an_answer_tag_and_a_gold_box():
    assert rewards.iou_reward(["[10, 20, 50, 60]"], solution=[gold("[10, 20, 50, 60]")]) == [0.0]  # no <answer>
    assert rewards.iou_reward([box_answer("[10, 20, 50, 60]")], solution=[gold("3")]) == [0.0]  # no gold box
    assert rewards.iou_reward([box_answer("[10, 20, 50, 60]")], solution=[gold("[5, 5, 5, 9]")]) == [0.0]


def test_iou_reward_reads_the_box_in_the_frame_qwen_sees():
    """The stored image is 100x60; Qwen2.5-VL sees it resized to 112x56 (multiples of 28) and answers in that
    frame: [0, 0, 112, 56] is the whole image, the gold [0, 0, 100, 60]."""
    kwargs = dict(solution=[gold("[0, 0, 100, 60]")], image_sizes=[[[100, 60]]], model_image_sizes=[[[112, 56]]])
    assert rewards.iou_reward([box_answer("[0, 0, 112, 56]")], **kwargs) == [pytest.approx(1.0)]
    # the same answer read in the stored frame (no conversion) overlaps 100x56 of a 112x60 union
    assert rewards.iou_reward([box_answer("[0, 0, 112, 56]")], solution=kwargs["solution"]) == [
        pytest.approx(100 * 56 / (112 * 56 + 100 * 60 - 100 * 56))]


# ---- your own reward, from a file or a module --------------------------------------------------------------------

MY_REWARD = '''
def short_answer(completions, answer, **kwargs):
    return [1.0 if len(c[-1]["content"]) < 40 else 0.0 for c in completions]

def no_kwargs(completions):
    return [0.0 for _ in completions]

def two_scores(completions, **kwargs):
    return [0.0, 1.0]

def needs_a_column(completions, bounding_box, **kwargs):
    return [0.0 for _ in completions]

def raises(completions, **kwargs):
    raise KeyError("gold")
'''
ROW = {"prompt": [{"role": "user", "content": "q"}], "problem": "q", "solution": gold("3"), "answer": gold("3")}


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "elsewhere" / "my_reward.py"
    path.parent.mkdir()
    path.write_text(MY_REWARD)
    return path


def test_rewards_from_a_file_and_a_module_mix_with_the_names(reward_file, tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "scores.py").write_text("def always_one(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)  # a package of the repository the job cloned, run from its root
    specs = ["format", f"{reward_file}:short_answer", "pkg.scores:always_one"]
    funcs = get_reward_funcs(specs)
    assert funcs[0] is format_reward
    assert [f.__name__ for f in funcs] == ["format_reward", "short_answer", "always_one"]  # TRL logs these names
    rewards.check_reward_funcs(specs, funcs, ROW)
    assert funcs[1]([box_answer("1")], answer=["x"]) == [1.0]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("{file}:shortanswer", "has no function 'shortanswer' (its functions: ['needs_a_column', 'no_kwargs', "
                               "'raises', 'short_answer', 'two_scores'])"),
        ("{dir}/missing.py:f", "no file"),
        ("{file}:no_kwargs", "does not have TRL's reward signature"),
        ("no_such_package_xyz.mod:f", "importing module no_such_package_xyz.mod failed: ModuleNotFoundError"),
        ("acuracy", "unknown reward function 'acuracy'"),
    ],
)
def test_a_reward_that_cannot_load_is_one_line_naming_it(reward_file, spec, expected):
    spec = spec.format(file=reward_file, dir=reward_file.parent)
    with pytest.raises(rewards.RewardError) as err:
        get_reward_funcs(["format", spec])
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"--reward_funcs {spec}:") or spec == "acuracy"


def test_a_reward_file_that_fails_to_import_is_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import numpy\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(rewards.RewardError, match=r"importing .*broken.py failed: RuntimeError: no GPU here$"):
        get_reward_funcs([f"{bad}:f"])


@pytest.mark.parametrize(
    "function, expected",
    [
        ("two_scores", "returned 2 scores for 1 completion"),
        ("needs_a_column", "raised TypeError"),
        ("raises", "raised KeyError: 'gold'"),
    ],
)
def test_the_dummy_call_catches_a_reward_that_would_fail_in_training(reward_file, function, expected):
    spec = f"{reward_file}:{function}"
    with pytest.raises(rewards.RewardError) as err:
        rewards.check_reward_funcs([spec], get_reward_funcs([spec]), ROW)
    assert str(err.value).startswith(f"--reward_funcs {spec}: ") and expected in str(err.value)
    if function == "needs_a_column":
        assert "the dataset's columns: ['answer', 'problem', 'solution']" in str(err.value)


def test_every_builtin_reward_passes_the_dummy_call():
    rewards.check_reward_funcs(list(REWARD_FUNCS), list(REWARD_FUNCS.values()), ROW)
