"""scripts/infer.py, the docs' inference example: one image and a question through a merged tiny model."""

from __future__ import annotations

import shlex
import sys

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)
from _tiny import REPO, make_adapter

import infer
import merge_lora
from synthetic_data import make_synthetic_rows

@pytest.fixture(scope="session")
def tiny_adapter(tiny_model):
    return make_adapter(tiny_model)



@pytest.fixture(scope="module")
def merged_and_image(tmp_path_factory, tiny_adapter):
    tmp = tmp_path_factory.mktemp("infer")
    merge_lora.main(["--adapter", str(tiny_adapter), "--output_dir", str(tmp / "merged"), "--dtype", "float32"])
    rows = make_synthetic_rows(2, seed=3)
    rows["image"][1].save(tmp / "number.png")
    return tmp / "merged", tmp / "number.png"


def docs_infer_args() -> list[str]:
    """INFER_ARGS of the guide's `make infer` command (the serving step's test call), as scripts/infer.py receives
    them; tests/test_serve.py runs them against a real server, README's rehearsal is run by tests/test_walkthrough.py."""
    from flexai_stub import block_commands, shell_blocks

    guide = (REPO / "experiments" / "vlm-grpo" / "README.md").read_text()
    commands = [c for b in shell_blocks(guide) for c in block_commands(b) if c[:2] == ["make", "infer"]]
    assert len(commands) == 1, commands
    (knob,) = [a for a in commands[0] if a.startswith("INFER_ARGS=")]
    return shlex.split(knob.split("=", 1)[1])


def test_docs_command_answers(merged_and_image):
    # the guide's `make infer` arguments, with the endpoint swapped for the tiny merged model and a synthetic image
    merged, image = merged_and_image
    args = docs_infer_args()
    assert args[:2] == ["--endpoint", "$ENDPOINT_URL"] and "--question" in args
    args[:2] = ["--model", str(merged)]
    args[args.index("--image") + 1] = str(image)
    proc = _proc.run([sys.executable, "scripts/infer.py", *args, "--max_new_tokens", "16"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("answer: ")


def test_merged_and_adapter_answer_alike(merged_and_image, tiny_model, tiny_adapter):
    merged, image = merged_and_image
    q = "What number is written in the image?"
    from_merged = infer.answer(str(merged), str(image), q, max_new_tokens=16)
    # adapter on the base, unmerged (merged saved in float32: greedy decoding must agree token for token)

    from_adapter = infer.answer(str(tiny_model), str(image), q, adapter=str(tiny_adapter), max_new_tokens=16)
    assert from_merged == from_adapter


@pytest.mark.parametrize("kwargs, message", [
    (dict(image="missing.png"), "cannot read --image"),
    (dict(question="  "), "--question is empty"),
])
def test_bad_inputs(merged_and_image, kwargs, message):
    merged, image = merged_and_image
    args = dict(image=str(image), question="How many?") | kwargs
    with pytest.raises(ValueError, match=message):
        infer.answer(str(merged), args["image"], args["question"])


# ---- --endpoint: an OpenAI-compatible server (tests/test_serve.py runs a real one) ----------------------------------


def test_endpoint_prompt_is_the_training_prompt_with_the_image_first(tmp_path):
    from data import make_prompt
    from rewards import SYSTEM_PROMPT

    rows = make_synthetic_rows(1, seed=0)
    rows["image"][0].save(tmp_path / "i.png")
    url = infer.image_data_url(str(tmp_path / "i.png"))
    assert url.startswith("data:image/png;base64,")
    import base64

    assert base64.b64decode(url.split(",", 1)[1]) == (tmp_path / "i.png").read_bytes()
    system, user = make_prompt("How many?", SYSTEM_PROMPT)
    assert infer.endpoint_messages("How many?", url) == [
        system, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": user["content"]}]}]


@pytest.mark.parametrize("args, message", [
    (["--endpoint", "http://127.0.0.1:9", "--image", "experiments/vlm-grpo/samples/number.png", "--question", "q"],
     "error: cannot reach http://127.0.0.1:9/v1/models"),
    (["--endpoint", "http://127.0.0.1:9", "--image", "missing.png", "--question", "q"], "error: cannot read --image"),
    (["--image", "x.png", "--question", "q"], "give one of --model"),
    (["--model", "m", "--endpoint", "http://e", "--image", "x.png", "--question", "q"], "give one of --model"),
    (["--endpoint", "http://e", "--adapter", "a", "--image", "x.png", "--question", "q"], "--adapter needs --model"),
])
def test_endpoint_bad_inputs_are_one_line(args, message):
    proc = _proc.run([sys.executable, "scripts/infer.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
