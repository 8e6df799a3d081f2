"""Multi-node the way FlexAI launches it: `make flexai-train NODES=2` hands FlexAI a bare script entry
(`code/vlm-grpo/grpo_vlm.py --deepspeed code/vlm-grpo/deepspeed_zero3.json <seed flags>`), and FlexAI's CLI runs it
with torchrun on every node. Here two torchrun agents on 127.0.0.1 (`--nnodes 2 --nproc_per_node 1`, node ranks 0 and
1) play the two nodes, running the entry the Makefile produced, seed flags and vLLM colocate included (tiny model,
`synthetic`): the run trains 2 steps under ZeRO-3 sharded across the two nodes and checkpoints; then the entry of
`make flexai-resume NODES=2`, given that checkpoint as FlexAI mounts it (FLEXAI_INPUT_CHECKPOINT_DIR), continues to
step 4 instead of starting over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)
from flexai_stub import REPO, run_make

from _vllm import require_vllm

pytestmark = pytest.mark.slow

PYTHON = _proc.PYTHON


def makefile_entry(tmp: Path, target: str, *knobs: str) -> list[str]:
    """What FlexAI would run on each node for `make TARGET NODES=2 ACCELS=1 KNOBS`, read from the recording stub."""
    run = run_make(tmp, target, "NODES=2", "ACCELS=1", *knobs)
    assert run.returncode == 0, run.stderr
    (argv,) = run.argv("flexai")
    return argv[argv.index("--") + 1 :]


def offline(entry: list[str], model: Path, out: Path, steps: int) -> list[str]:
    """The entry with only the model and output dir swapped, plus the offline dataset, step count, short completions
    (64 tokens keep a CPU run under a minute) and logging of every step."""
    args = list(entry)
    args[args.index("--model_name_or_path") + 1] = str(model)
    args[args.index("--output_dir") + 1] = str(out)
    return [*args, "--dataset_name", "synthetic", "--max_steps", str(steps), "--max_completion_length", "64",
            "--logging_steps", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(entry: list[str], logs: Path, env_extra: dict | None = None, timeout: int = 420) -> list[str]:
    """Run `entry` on two torchrun agents (one process each) rendezvousing on 127.0.0.1; returns each node's log.
    Logs go to files, not pipes (a full pipe would block the run); both agents are killed if either hangs."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env_extra or {})}
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:  # on any exit: both agents and their workers killed (tests/_proc.py)
        procs = []
        for rank in (0, 1):
            cmd = [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port), *entry]
            log = stack.enter_context(open(logs / f"node{rank}.log", "w"))
            procs.append(stack.enter_context(_proc.started(cmd, cwd=REPO, env=env, stdout=log,
                                                           stderr=subprocess.STDOUT)))
        codes = [proc.wait(timeout=timeout) for proc in procs]
    texts = [(logs / f"node{rank}.log").read_text(errors="replace") for rank in (0, 1)]
    assert codes == [0, 0], f"exit codes {codes}\n--- node 0\n{texts[0][-4000:]}\n--- node 1\n{texts[1][-4000:]}"
    return texts


@pytest.fixture(scope="module")
def train_entry(tmp_path_factory) -> list[str]:
    return makefile_entry(tmp_path_factory.mktemp("make-train"), "flexai-train")


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory, train_entry):
    require_vllm()
    tmp = tmp_path_factory.mktemp("multinode")
    first = two_nodes(offline(train_entry, tiny_model, tmp / "run", 2), tmp / "logs-first")
    checkpoint = tmp / "run" / "checkpoint-2"
    # FlexAI mounts `--checkpoint <id>` at FLEXAI_INPUT_CHECKPOINT_DIR; the new job writes to a fresh output dir
    resume_entry = makefile_entry(tmp / "make-resume", "flexai-resume", "CKPT=ckpt-id")
    second = two_nodes(offline(resume_entry, tiny_model, tmp / "resumed", 4), tmp / "logs-second",
                       {"FLEXAI_INPUT_CHECKPOINT_DIR": str(checkpoint)})
    return {"tmp": tmp, "train_entry": train_entry, "resume_entry": resume_entry, "first": first, "second": second,
            "checkpoint": checkpoint}


def test_the_makefile_entry_is_the_bare_script_with_the_deepspeed_json(train_entry):
    entry = train_entry
    assert entry[:3] == ["code/vlm-grpo/grpo_vlm.py", "--deepspeed", "code/vlm-grpo/deepspeed_zero3.json"]
    assert "accelerate" not in entry and "--use_vllm" in entry and entry[entry.index("--vllm_mode") + 1] == "colocate"


def test_two_nodes_train_through_vllm_colocate_and_checkpoint(runs):
    log = runs["first"][0]
    plan = json.loads(log.split("plan: ", 1)[1].splitlines()[0])
    assert plan["processes"] == 2 and plan["generation"] == "vLLM colocate"
    state = json.loads((runs["checkpoint"] / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # ZeRO-3 sharded over both nodes: one optimizer-state partition per rank
    shards = sorted(p.name for p in (runs["checkpoint"] / "global_step2").glob("*optim_states.pt"))
    assert len(shards) == 2 and any("rank_1_" in s for s in shards), shards
    from safetensors import safe_open

    with safe_open(str(runs["tmp"] / "run" / "adapter_model.safetensors"), framework="pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    assert shapes and all(s and 0 not in s for s in shapes), shapes  # not the empty ZeRO-3 adapter (trl#4416)


def test_the_resumed_job_continues_the_step_count(runs):
    resumed = runs["tmp"] / "resumed"
    assert str(runs["checkpoint"]) in runs["second"][0], "the resumed job names the checkpoint it starts from"
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4"]
    state = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4], steps  # steps 1-2 carried over from the checkpoint, 3-4 trained now, none twice
    first = json.loads((runs["checkpoint"] / "trainer_state.json").read_text())["log_history"]
    assert [h for h in state["log_history"] if h["step"] <= 2 and "loss" in h] == [h for h in first if "loss" in h]
