"""A run records which source rows it trained on and which it held out (split.json, in the output dir and in every
checkpoint), and scripts/evaluate.py scores exactly the recorded held-out rows, whatever data arguments it is given:
evaluation can never score a training row."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.slow


def test_evaluation_scores_the_runs_recorded_held_out_rows_only(tiny_model, processor, tmp_path, single_process_run):
    import evaluate

    out = tmp_path / "run"
    shutil.copytree(single_process_run[0], out)  # 64 synthetic rows, --eval_fraction 0.25, 2 steps, one process

    record = json.loads((out / "split.json").read_text())
    assert json.loads((out / "checkpoint-2" / "split.json").read_text()) == record  # a fetched checkpoint carries it
    train, held_out = set(record["train_source_indices"]), set(record["held_out_source_indices"])
    assert len(held_out) == 16 and len(train) == 48  # floor(64 x 0.25) held out; the synthetic rows all pass
    assert not train & held_out and train | held_out == set(range(64))

    # Evaluation told a different fraction and seed than training used: it still scores the run's held-out rows.
    eval_args = evaluate.parse_args(["--model_name_or_path", str(tiny_model), "--adapter", str(out / "checkpoint-2"),
                                     "--dataset_name", "synthetic", "--synthetic_rows", "64", "--eval_fraction", "0.5",
                                     "--seed", "7", "--output_dir", str(tmp_path / "eval")])
    rows = evaluate.load_eval_rows(eval_args, processor, out / "checkpoint-2")
    assert set(rows["source_index"]) == held_out

    # Without the record the split is re-derived from those (wrong) arguments: training rows get scored.
    (out / "split.json").unlink()
    (out / "checkpoint-2" / "split.json").unlink()
    rederived = evaluate.load_eval_rows(eval_args, processor, out / "checkpoint-2")
    assert set(rederived["source_index"]) & train
