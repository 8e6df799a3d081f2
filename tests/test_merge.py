"""scripts/merge_lora.py on the tiny model: the merged model reproduces the adapter model, bad inputs are refused
with messages that say what to do."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)
import torch
from _tiny import REPO, make_adapter, wide_model_dir

import merge_lora
from adapters import AdapterError, find_adapter_dir, load_base_model, load_processor

@pytest.fixture(scope="session")
def tiny_adapter(tiny_model):
    return make_adapter(tiny_model)



def logits(model, processor):
    return merge_lora.logits_of(model, merge_lora.sample_inputs(processor, "cpu"))


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_adapter):
    out = tmp_path_factory.mktemp("merged")
    info = merge_lora.main(["--adapter", str(tiny_adapter), "--output_dir", str(out), "--dtype", "float32",
                            "--overwrite"])
    return out, info


def test_merged_model_gives_the_adapter_models_logits(merged, tiny_model, tiny_adapter):
    from peft import PeftModel

    out, info = merged
    processor = load_processor(out)
    with_adapter = PeftModel.from_pretrained(load_base_model(str(tiny_model)), str(tiny_adapter)).eval()
    expected = logits(with_adapter, processor)
    got = logits(load_base_model(str(out)), processor)  # the saved folder, loaded as any model
    base = logits(load_base_model(str(tiny_model)), processor)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (expected - base).abs().max() > 1e-2, "adapter has no effect: the equivalence would prove nothing"
    assert info["logits_relative_diff"] <= info["tolerance"]
    assert json.loads((out / "merge_info.json").read_text())["base_model"] == str(tiny_model)


def test_merged_folder_is_a_standalone_model(merged):
    out, _ = merged
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert "adapter_config.json" not in names  # vLLM would take it for an adapter folder
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


def test_default_dtype_is_the_bases(tmp_path, tiny_adapter):
    info = merge_lora.main(["--adapter", str(tiny_adapter), "--output_dir", str(tmp_path / "m")])
    assert info["saved_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"


def test_check_fails_loudly_and_saves_nothing(tmp_path, tiny_adapter):
    # bf16 merging rounds W + BA: an impossible tolerance must trip the check, and nothing may be written
    with pytest.raises(merge_lora.MergeError, match="nothing saved"):
        merge_lora.main(["--adapter", str(tiny_adapter), "--output_dir", str(tmp_path / "m"),
                         "--merge_dtype", "bfloat16", "--tolerance", "1e-12"])
    assert not (tmp_path / "m").exists()


# ---- finding the adapter in what users have ---------------------------------------------------------------------


def copy_adapter(tiny_adapter, dst):
    shutil.copytree(tiny_adapter, dst)
    return dst


def test_finds_newest_checkpoint_of_a_run_folder(tmp_path, tiny_adapter):
    for step in (5, 20, 10):
        copy_adapter(tiny_adapter, tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-30").mkdir()  # a half-written checkpoint is skipped
    assert find_adapter_dir(tmp_path) == tmp_path / "checkpoint-20"


def test_finds_adapter_of_a_fetched_flexai_checkpoint(tmp_path, tiny_adapter):
    nested = copy_adapter(tiny_adapter, tmp_path / "fetched" / "ckpt-1234" / "output")
    assert find_adapter_dir(tmp_path / "fetched") == nested


def test_several_adapters_are_ambiguous(tmp_path, tiny_adapter):
    copy_adapter(tiny_adapter, tmp_path / "a")
    copy_adapter(tiny_adapter, tmp_path / "b")
    with pytest.raises(AdapterError, match="several adapters"):
        find_adapter_dir(tmp_path)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "no LoRA adapter in"),
        (lambda p: (p / "adapter_config.json").write_text("{}") and p, "no adapter weights"),
        (lambda p: (p / "config.json").write_text("{}") and p, "is a full model"),
    ],
    ids=["missing", "empty", "config-only", "full-model"],
)
def test_missing_adapter_is_refused_clearly(tmp_path, setup, message):
    with pytest.raises(AdapterError, match=message):
        merge_lora.main(["--adapter", str(setup(tmp_path)), "--output_dir", str(tmp_path / "out")])


def test_wrong_base_name_is_refused(tmp_path, tiny_adapter):
    with pytest.raises(AdapterError, match="base model mismatch.*was trained on"):
        merge_lora.main(["--adapter", str(tiny_adapter), "--output_dir", str(tmp_path / "m"),
                         "--model_name_or_path", str(wide_model_dir())])
    assert not (tmp_path / "m").exists()


def test_wrong_base_shapes_are_refused_even_when_the_name_check_is_skipped(tmp_path, tiny_adapter):
    with pytest.raises(AdapterError, match="does not fit the base model.*input features"):
        merge_lora.main(["--adapter", str(tiny_adapter), "--output_dir", str(tmp_path / "m"),
                         "--model_name_or_path", str(wide_model_dir()), "--ignore_base_name"])


def test_same_name_elsewhere_is_accepted(tmp_path, tiny_model, tiny_adapter):
    copy = shutil.copytree(tiny_model, tmp_path / "models" / tiny_model.name)
    info = merge_lora.main(["--adapter", str(tiny_adapter), "--output_dir", str(tmp_path / "m"),
                            "--model_name_or_path", str(copy)])
    assert info["base_model"] == str(copy)


def test_cli_error_is_one_line(tmp_path):
    proc = _proc.run([sys.executable, "scripts/merge_lora.py", "--adapter", str(tmp_path / "nope"),
                           "--output_dir", str(tmp_path / "m")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: adapter path")
    assert "Traceback" not in proc.stderr


# ---- inference ready: what FlexAI serves (`make flexai-checkpoint-push` runs the same check) ----------------------


def test_merged_folder_is_inference_ready(merged):
    out, info = merged
    assert info["inference_ready"] is True
    assert merge_lora.inference_ready_problems(out) == []


@pytest.mark.parametrize("breakage, fragment", [
    (lambda d: (d / "config.json").write_text(json.dumps({k: v for k, v in json.loads((d / "config.json").read_text()).items()
                                                          if k != "architectures"})), "has no `architectures`"),
    (lambda d: (d / "chat_template.jinja").unlink(), "no chat template"),
    (lambda d: (d / "preprocessor_config.json").unlink(), "image processor is missing"),
    (lambda d: (d / "model.safetensors").unlink(), "no weights"),
], ids=["architectures", "chat-template", "processor", "weights"])
def test_check_inference_ready_names_what_is_missing_in_one_line(merged, tmp_path, breakage, fragment):
    broken = shutil.copytree(merged[0], tmp_path / "broken")
    breakage(broken)
    proc = _proc.run([sys.executable, "scripts/merge_lora.py", "--check_inference_ready", str(broken)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 1 and fragment in proc.stdout
    ready = _proc.run([sys.executable, "scripts/merge_lora.py", "--check_inference_ready", str(merged[0])],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ready.stdout == ""


def test_the_tiny_base_itself_is_not_inference_ready(tiny_model):
    # transformers 4.57 drops `architectures` from a Qwen2.5-VL config.json it saves (restore_config_keys): the
    # check is not hypothetical, the tiny model's own folder lacks it and FlexAI would not serve it
    assert any("architectures" in p for p in merge_lora.inference_ready_problems(tiny_model))
