"""Run grpo_vlm.py's `main` under `accelerate launch` and record every prompt handed to the colocated vLLM engine.

    accelerate launch --config_file code/vlm-grpo/deepspeed_zero3.yaml tests/own_task_check.py REPORT.json \\
        <grpo_vlm.py arguments>

Each rank writes REPORT.json.rank<N>: one entry per prompt it sent to vLLM, with the number of images in it (runs of
`<|image_pad|>` that vllm_colocate.collapse_image_pads reduced to one placeholder each) and whether the prompt ids vLLM
reported after its own expansion equal the ids the trainer scores (vllm_colocate.check_engine_prompts, M8). The
recipe's code runs unchanged; the two functions are wrapped to record what they saw.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code" / "vlm-grpo"))

import grpo_vlm  # noqa: E402
import vllm_colocate  # noqa: E402

handoffs: list[dict] = []
_collapse, _check = vllm_colocate.collapse_image_pads, vllm_colocate.check_engine_prompts


def recording_collapse(ids, pad_id):
    out = _collapse(ids, pad_id)
    handoffs.append({"images": out.count(pad_id), "trainer_tokens": len(ids)})
    return out


def recording_check(trainer_ids, engine_ids):
    sent = handoffs[-len(trainer_ids):]
    for entry, ours, theirs in zip(sent, trainer_ids, engine_ids, strict=True):
        entry["engine_equals_trainer"] = list(ours) == list(theirs)
    return _check(trainer_ids, engine_ids)


vllm_colocate.collapse_image_pads = recording_collapse
vllm_colocate.check_engine_prompts = recording_check

if __name__ == "__main__":
    report = Path(sys.argv[1])
    try:
        grpo_vlm.main(*grpo_vlm.parse_args(sys.argv[2:]))
    finally:
        rank = os.environ.get("RANK", "0")
        Path(f"{report}.rank{rank}").write_text(json.dumps(handoffs))
    gc.freeze()  # as grpo_vlm.py ends: the interpreter's last garbage scan skips what torch and vLLM hold (~2 s)
