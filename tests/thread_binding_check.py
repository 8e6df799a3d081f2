"""Run by tests/test_vllm_colocate.py (a fork of tests/_forkserver.py's server: vLLM imported once, nothing patched):
vllm_colocate.cpu_thread_binding_workaround with a GPU reported, then without one; prints what CPUWorker's autobind
method is after each."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code" / "vlm-grpo"))
from vllm.v1.worker.cpu_worker import CPUWorker  # noqa: E402

from vllm_colocate import cpu_thread_binding_workaround  # noqa: E402

upstream = CPUWorker._get_autobind_cpu_ids
for gpu in (True, False):
    torch.cuda.is_available = lambda: gpu
    cpu_thread_binding_workaround()
    patched = CPUWorker._get_autobind_cpu_ids
    print(f"gpu={gpu}", "upstream" if patched is upstream else "replaced:" + patched(None, None))
