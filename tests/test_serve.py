"""Checkpoint to endpoint, the serving side for real, for Qwen2.5-VL and Qwen3-VL: the merged tiny model
(scripts/merge_lora.py, as `make merge` writes it) is what `make flexai-checkpoint-push` accepts as inference ready,
and vLLM's OpenAI-compatible server (the CPU build; FlexAI's `flexai inference serve` runs vLLM) serves it on
127.0.0.1, where scripts/infer.py's `--endpoint` client, the code users run against their FlexAI endpoint, asks it
about images. The server is bounded in time and stopped by the test, whatever happens."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)
from _tiny import REPO, make_adapter
from flexai_stub import run_make

import infer
import merge_lora
from _vllm import require_vllm

pytestmark = pytest.mark.slow

PYTHON = _proc.PYTHON
START_TIMEOUT = 300  # seconds for the server to answer /health (about 40 s on the 2-core CI machine)
API_KEY = "test-endpoint-key-7f3a"  # `vllm serve --api-key`: /v1 requests need it, sent by the client as a Bearer token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The seed's family, and one other (issue 20): Qwen3-VL, whose processor, chat template and weight layout differ most.
@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl"])
def merged(request, family_model, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp(f"serve-{family}") / "merged"
    adapter = make_adapter(family_model(family), name=f"adapter-{family}")
    merge_lora.main(["--adapter", str(adapter), "--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def server(merged, tmp_path_factory):
    """`vllm serve`'s OpenAI server on the merged folder as it is (no extra flags about the model: the folder must
    say everything); yields its URL, then kills its process group."""
    require_vllm()
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log, _proc.started(
        [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(merged), "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "2048", "--api-key", API_KEY],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    ) as proc:  # the server and its engine process are killed when the module's tests are done
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"no /health after {START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(2)
        yield url


def test_the_merged_folder_is_what_checkpoint_push_accepts(merged, tmp_path):
    assert merge_lora.inference_ready_problems(merged) == []
    run = run_make(tmp_path, "flexai-checkpoint-push", f"MERGED={merged}")
    assert run.returncode == 0, run.stderr
    assert run.argv("flexai") == [["checkpoint", "push", "vlm-grpo-training-merged", "--file", str(merged)]]


def processor_prompt_tokens(merged, image, question: str) -> int:
    """Prompt length the trainer's processor gives this image and question (image tokens expanded), counted
    independently of vLLM."""
    from transformers import AutoProcessor

    from data import make_prompt
    from rewards import SYSTEM_PROMPT

    system, user = make_prompt(question, SYSTEM_PROMPT)
    conversation = [{"role": "system", "content": [{"type": "text", "text": system["content"]}]},
                    {"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": user["content"]}]}]
    processor = AutoProcessor.from_pretrained(merged)
    ids = processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(ids["input_ids"][0])


def test_the_endpoint_answers_about_each_image_through_the_users_client(server, merged, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("FLEXAI_API_KEY", API_KEY)  # the server refuses /v1 requests without it (next tests)
    question = "How many shapes are in the image?"
    for size in ((56, 56), (224, 140)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, "red").save(path)
        completion, prediction, reply = infer.ask_endpoint(server, str(path), question, max_new_tokens=8)
        assert reply["model"] == str(merged)  # the first (only) model the server lists
        assert reply["usage"]["completion_tokens"] >= 1 and isinstance(completion, str)
        # the image reached the model and was expanded exactly as in training: the prompt lengths agree
        assert reply["usage"]["prompt_tokens"] == processor_prompt_tokens(merged, Image.open(path).convert("RGB"), question)


def test_the_guides_test_call_prints_the_completion_and_the_graded_answer(server):
    from test_infer import docs_infer_args

    # the guide's `make infer INFER_ARGS=...` of the serving step, ENDPOINT_URL being the server's
    args = [server if a == "$ENDPOINT_URL" else a for a in docs_infer_args()]
    proc = _proc.run(
        [PYTHON, "scripts/infer.py", *args, "--max_new_tokens", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "FLEXAI_API_KEY": API_KEY},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("answer: ")
    assert API_KEY not in proc.stdout + proc.stderr


@pytest.mark.parametrize("key", [None, "not-the-key"])
def test_without_the_right_key_the_client_fails_in_one_line_naming_the_variable(server, key):
    """The server was started with --api-key: the test above passed because the client sent the key."""
    env = {k: v for k, v in os.environ.items() if k not in ("FLEXAI_API_KEY", "OPENAI_API_KEY")}
    if key:
        env["FLEXAI_API_KEY"] = key
    proc = _proc.run(
        [PYTHON, "scripts/infer.py", "--endpoint", server, "--image", "experiments/vlm-grpo/samples/number.png",
         "--question", "What number is written in the image?", "--max_new_tokens", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert f"{server}/v1/models answered HTTP 401 (set FLEXAI_API_KEY or OPENAI_API_KEY)" in proc.stderr
    assert (key or API_KEY) not in proc.stdout + proc.stderr


def test_a_wrong_model_name_is_one_line(server, tmp_path):
    proc = _proc.run(
        [PYTHON, "scripts/infer.py", "--endpoint", server, "--served_model", "no-such-model", "--image",
         "experiments/vlm-grpo/samples/number.png", "--question", "What number?"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "FLEXAI_API_KEY": API_KEY},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "HTTP 404" in proc.stderr and "no-such-model" in proc.stderr
