"""scripts/evaluate.py on the tiny model: its numbers are the rewards of its completions, the rows are training's
held-out split, adapter and merged model agree, bad inputs fail with a clear message."""

from __future__ import annotations

import json
import os

import pytest

import _forkserver  # every test process: time-bounded, whole tree killed (tests/_proc.py, tests/_forkserver.py)
from _tiny import make_adapter

import evaluate
import merge_lora
from adapters import AdapterError
from data import DatasetError
from rewards import REWARD_FUNCS

# 40 rows, 8 held out; greedy so adapter and merged model must write the same completions
DATA = ["--dataset_name", "synthetic", "--synthetic_rows", "40", "--eval_fraction", "0.2", "--seed", "7"]
GEN = ["--max_new_tokens", "12", "--backend", "hf", "--no_progress"]

@pytest.fixture(scope="session")
def tiny_adapter(tiny_model):
    return make_adapter(tiny_model)



@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model, tiny_adapter):
    tmp = tmp_path_factory.mktemp("eval")
    merge_lora.main(["--adapter", str(tiny_adapter), "--output_dir", str(tmp / "merged"), "--dtype", "float32"])
    out = tmp / "report"
    report = evaluate.main(["--model_name_or_path", str(tiny_model), "--adapter", str(tiny_adapter),
                            "--merged_model", str(tmp / "merged"), "--output_dir", str(out), *DATA, *GEN])
    return out, report


def completions(out, label):
    return [json.loads(line) for line in (out / f"completions-{label}.jsonl").read_text().splitlines()]


def test_scores_are_the_rewards_of_the_written_completions(evaluated):
    out, report = evaluated
    assert json.loads((out / "eval.json").read_text()) == report
    for label in ("base", "adapter", "merged"):
        rows = completions(out, label)
        texts = [[{"role": "assistant", "content": c}] for r in rows for c in r["completions"]]
        solutions = [r["solution"] for r in rows for _ in r["completions"]]
        scores = report["models"][label]["scores"]
        assert set(REWARD_FUNCS) <= set(scores)  # every registered reward, digit_ratio included
        for name, func in REWARD_FUNCS.items():
            values = func(texts, solution=solutions)
            assert scores[name] == pytest.approx(sum(values) / len(values)), (label, name)
        assert scores["format_rate"] == scores["format"]
        assert scores["accuracy_timeouts"] == 0  # integers and short answers: nothing for math-verify to time out on
        assert scores["completions"] == len(texts) == report["questions"] == 8


# The rows of `synthetic`, 40 rows, seed 7, that training holds out at --eval_fraction 0.2 (no row is filtered), in
# order: computed once with grpo_vlm.load_datasets and written down, so the test does not re-derive its expectation
# with the code it checks.
HELD_OUT_ROWS = [4, 0, 28, 20, 30, 10, 12, 32]


def test_rows_are_trainings_held_out_split(evaluated):
    out, _ = evaluated
    from synthetic_data import make_synthetic_rows

    source = make_synthetic_rows(40, seed=7)
    scored = [(r["problem"], r["solution"]) for r in completions(out, "base")]
    assert scored == [(source["problem"][i], source["solution"][i]) for i in HELD_OUT_ROWS]


def test_merged_model_answers_like_the_adapter(evaluated):
    out, report = evaluated
    assert completions(out, "merged") == completions(out, "adapter")
    assert completions(out, "adapter") != completions(out, "base")  # the adapter changes the model
    assert report["models"]["adapter"]["delta_vs_base"]["digit_ratio"] == pytest.approx(
        report["models"]["adapter"]["scores"]["digit_ratio"] - report["models"]["base"]["scores"]["digit_ratio"])


def test_markdown_table_has_every_metric_side_by_side(evaluated):
    out, report = evaluated
    table = (out / "eval.md").read_text()
    assert table.splitlines()[0] == "| metric | base | adapter | merged | adapter − base | merged − base |"
    for metric in ("accuracy", "format_rate", "tag_count", "digit_ratio"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {metric} |"))
        assert f"{report['models']['base']['scores'][metric]:.3f}" in row


def test_empty_dataset_is_refused(tmp_path, tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how `datasets` stores an Image column
    schema = pa.schema([("image", image), ("problem", pa.string()), ("solution", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
    with pytest.raises(DatasetError, match="empty.parquet.*empty"):
        evaluate.main(["--model_name_or_path", str(tiny_model), "--dataset_name", str(tmp_path / "empty.parquet"),
                       "--split", "all", "--output_dir", str(tmp_path / "out"), *GEN])


def test_dataset_emptied_by_the_filters_is_refused(tmp_path, tiny_model):
    with pytest.raises(DatasetError, match="no rows left after filtering.*max_image_side"):
        evaluate.main(["--model_name_or_path", str(tiny_model), *DATA, "--max_image_side", "10", "--image_policy", "drop",
                       "--output_dir", str(tmp_path), *GEN])


def test_held_out_split_needs_an_eval_fraction(tmp_path, tiny_model):
    with pytest.raises(DatasetError, match="--split all"):
        evaluate.main(["--model_name_or_path", str(tiny_model), "--dataset_name", "synthetic",
                       "--eval_fraction", "0", "--output_dir", str(tmp_path), *GEN])


def test_missing_adapter_is_refused(tmp_path, tiny_model):
    with pytest.raises(AdapterError, match="does not exist"):
        evaluate.main(["--model_name_or_path", str(tiny_model), "--adapter", str(tmp_path / "nope"),
                       "--output_dir", str(tmp_path), *DATA, *GEN])


@pytest.mark.parametrize("flags, message", [
    (["--num_samples", "4"], "greedy"),
    (["--skip_base"], "nothing to score"),
    (["--temperature", "-1"], "temperature"),
])
def test_bad_arguments_are_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        evaluate.parse_args(["--model_name_or_path", "m", *flags])


def test_cli_error_is_one_line(tmp_path, tiny_model):
    proc = _forkserver.run("scripts/evaluate.py", ["--model_name_or_path", tiny_model, "--dataset_name",
                                                   "no-such-dataset", "--output_dir", tmp_path],
                           env=dict(os.environ), timeout=180)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --dataset_name 'no-such-dataset'")
    assert "Traceback" not in proc.stderr


