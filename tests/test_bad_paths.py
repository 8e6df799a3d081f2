"""A mistyped model folder, an adapter given as the model, or an output folder that cannot be written: every script
(grpo_vlm.py, merge_lora.py, evaluate.py, infer.py) answers with one `error: ...` line naming the path and what to pass,
before any model is loaded, and never with a Python traceback (issue 13, item 3).

The command-line cases run the scripts in a process of their own (grpo_vlm.py and evaluate.py as forks of
tests/_forkserver.py's server, which has the libraries imported); the unit cases call code/vlm-grpo/path_checks.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import _forkserver  # every test process: time-bounded, whole tree killed (tests/_proc.py, tests/_forkserver.py)
from _tiny import make_adapter

from path_checks import PathError, check_model_path, check_output_dir, looks_like_local_path

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def _unwritable_place() -> Path | None:
    """A folder nobody here may create folders in, root included (sysfs refuses mkdir even to root)."""
    for candidate in ("/sys", "/proc"):
        try:
            os.rmdir(tempfile.mkdtemp(dir=candidate))
        except OSError:
            return Path(candidate)
    return None


UNWRITABLE = _unwritable_place()
needs_unwritable = pytest.mark.skipif(UNWRITABLE is None, reason="no folder here refuses mkdir (no /sys or /proc)")


def run(script: str, *args) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` (a fork of tests/_forkserver.py's server for the scripts that import the recipe)."""
    return _forkserver.run(script, args, env=OFFLINE, timeout=300)


def the_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line the script printed, after checking it is the only one and the last, with no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model):
    return make_adapter(tiny_model)


# ---- grpo_vlm.py ----------------------------------------------------------------------------------------------

TRAIN = "code/vlm-grpo/grpo_vlm.py"
TRAIN_ARGS = ["--dataset_name", "synthetic", "--max_steps", "1", "--report_to", "none"]


@pytest.mark.parametrize("model", ["./no-such-model", "outputs/smoke/tiny-qwen2.5-vI", "~/no-such-models/qwen"])
def test_training_with_a_missing_model_folder_is_one_line(tmp_path, model):
    line = the_error_line(run(TRAIN, "--model_name_or_path", model, "--output_dir", tmp_path / "out", *TRAIN_ARGS))
    assert line.startswith(f"error: --model_name_or_path {model}: no such folder (")
    assert "Check the spelling" in line and "Qwen/Qwen2.5-VL-3B-Instruct" in line
    assert not (tmp_path / "out").exists()


def test_training_with_a_model_id_that_is_not_there_is_one_line(tmp_path):
    # one `/`: a Hub id as far as its form goes; offline and not cached, the loader fails, in one line too
    line = the_error_line(run(TRAIN, "--model_name_or_path", "no-such-owner/no-such-model",
                              "--output_dir", tmp_path / "out", *TRAIN_ARGS))
    assert line.startswith("error: --model_name_or_path no-such-owner/no-such-model: not a folder here, and it could "
                           "not be loaded (")


@needs_unwritable
def test_training_into_an_unwritable_output_dir_is_one_line(tiny_model):
    out = UNWRITABLE / "vlm-grpo-run"
    line = the_error_line(run(TRAIN, "--model_name_or_path", tiny_model, "--output_dir", out, *TRAIN_ARGS))
    assert line.startswith(f"error: --output_dir {out} cannot be written ({UNWRITABLE} is not writable")
    assert "pass a folder you can write to" in line


# ---- merge_lora.py, evaluate.py, infer.py ------------------------------------------------------------------------


@needs_unwritable
def test_merge_into_an_unwritable_output_dir_is_one_line(tiny_adapter):
    out = UNWRITABLE / "vlm-grpo-merged"
    line = the_error_line(run("scripts/merge_lora.py", "--adapter", tiny_adapter, "--output_dir", out))
    assert line.startswith(f"error: --output_dir {out} cannot be written")


def test_merge_with_a_missing_base_folder_is_one_line(tmp_path, tiny_adapter):
    line = the_error_line(run("scripts/merge_lora.py", "--adapter", tiny_adapter, "--output_dir", tmp_path / "m",
                              "--model_name_or_path", "./models/no-such-base"))
    assert line.startswith("error: --model_name_or_path ./models/no-such-base: no such folder")
    assert not (tmp_path / "m").exists()


def test_merge_names_the_recorded_base_when_it_is_not_here(tmp_path, tiny_adapter):
    # training records the base as its job saw it, e.g. a path relative to another machine's working folder
    adapter = shutil.copytree(tiny_adapter, tmp_path / "fetched")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "outputs/smoke/tiny-qwen2.5-vl-elsewhere"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    line = the_error_line(run("scripts/merge_lora.py", "--adapter", adapter, "--output_dir", tmp_path / "m"))
    assert line == (f"error: {adapter / 'adapter_config.json'} records the base model as "
                    "'outputs/smoke/tiny-qwen2.5-vl-elsewhere', which is no model folder here: pass "
                    "--model_name_or_path <the base model's folder or Hub id>")


def test_evaluate_with_a_missing_model_folder_is_one_line(tmp_path):
    line = the_error_line(run("scripts/evaluate.py", "--model_name_or_path", "../no-such-model",
                              "--output_dir", tmp_path / "eval"))
    assert line.startswith("error: --model_name_or_path ../no-such-model: no such folder")


@needs_unwritable
def test_evaluate_into_an_unwritable_output_dir_is_one_line(tiny_model):
    out = UNWRITABLE / "vlm-grpo-eval"
    line = the_error_line(run("scripts/evaluate.py", "--model_name_or_path", tiny_model, "--output_dir", out,
                              "--dataset_name", "synthetic"))
    assert line.startswith(f"error: --output_dir {out} cannot be written")


def test_infer_with_an_adapter_as_the_model_is_one_line(tmp_path, tiny_adapter):
    line = the_error_line(run("scripts/infer.py", "--model", tiny_adapter, "--image", tmp_path / "x.png",
                              "--question", "How many?"))
    assert line.startswith(f"error: --model {tiny_adapter} is a LoRA adapter, not a model: pass its base model")


def test_infer_with_a_missing_adapter_is_one_line(tmp_path, tiny_model):
    line = the_error_line(run("scripts/infer.py", "--model", tiny_model, "--adapter", tmp_path / "no-adapter",
                              "--image", tmp_path / "x.png", "--question", "How many?"))
    assert line.startswith(f"error: adapter path {tmp_path / 'no-adapter'} does not exist")


# ---- path_checks.py ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, local", [
    ("Qwen/Qwen2.5-VL-3B-Instruct", False),
    ("tiny", False),
    ("outputs/tiny", False),  # could be a Hub id: left to the loader
    ("outputs/smoke/tiny-qwen2.5-vl", True),
    ("./tiny", True),
    ("../tiny", True),
    ("/models/qwen", True),
    ("~/models/qwen", True),
    ("models/", True),
    ("Qwen/Qwen2.5 VL", True),  # a space: no Hub id has one
])
def test_what_looks_like_a_local_path(name, local):
    assert looks_like_local_path(name) is local


def test_model_folder_checks(tmp_path, tiny_model):
    check_model_path(str(tiny_model))  # a model folder passes
    check_model_path("Qwen/Qwen2.5-VL-3B-Instruct")  # a Hub id passes without any network access
    with pytest.raises(PathError, match="holds no config.json"):
        check_model_path(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(PathError, match="is a file"):
        check_model_path(str(tmp_path / "weights.bin"))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(PathError, match="--model .* is a LoRA adapter"):
        check_model_path(str(tmp_path), "--model")


def test_output_dir_checks_create_nothing(tmp_path):
    check_output_dir(str(tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []  # the probe folder is gone and the output folder is not made
    (tmp_path / "file").write_text("")
    with pytest.raises(PathError, match="is a file, not a folder"):
        check_output_dir(str(tmp_path / "file" / "run"))
