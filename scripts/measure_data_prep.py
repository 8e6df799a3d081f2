#!/usr/bin/env python
"""Wall time, CPU time and peak memory of data preparation, per process, on the code path training takes.

    python scripts/make_scale_parquet.py outputs/scale/train.parquet
    HF_DATASETS_CACHE=outputs/scale/hf-cache accelerate launch --config_file=code/vlm-grpo/deepspeed_zero3.yaml \\
        scripts/measure_data_prep.py --result outputs/scale/prep.json \\
        --model_name_or_path outputs/scale/tiny --dataset_name outputs/scale/train.parquet \\
        --output_dir outputs/scale/run --max_prompt_length 2048

Takes grpo_vlm.py's own flags (its parser, so the defaults are training's) plus `--result FILE`. Every process loads
the processor, then runs `grpo_vlm.load_datasets` exactly as `train()` does: under `accelerate launch` the node's
first process prepares the rows while the others wait, then they read datasets' cache. Process 0 writes one JSON
with each process's numbers. Point HF_DATASETS_CACHE at an empty folder to measure a cold start (what a fresh job
pays); a second run on the same folder measures the cached one.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code" / "vlm-grpo"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MemorySampler:
    """Highest anonymous and file-backed resident memory, sampled every 0.1 s from /proc/self/status. The kernel's
    peak RSS (ru_maxrss) counts the pages of memory-mapped arrow files the process touched, which the page cache can
    drop at any time; the anonymous part is what the process really holds."""

    def __init__(self, interval_s: float = 0.1):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) // 1024)  # kB -> MiB

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def split_result_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(value of --result, the other arguments): --result is this script's, the rest go to grpo_vlm's parser."""
    if "--result" not in argv:
        return None, argv
    i = argv.index("--result")
    if i + 1 >= len(argv):
        sys.exit("error: --result needs a file path")
    return argv[i + 1], argv[:i] + argv[i + 2 :]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") *
            os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def main() -> None:
    result_path, argv = split_result_flag(sys.argv[1:])
    started, load_at_start = time.monotonic(), os.getloadavg()  # the machine may be shared: its load is recorded
    import datasets
    import torch

    from grpo_vlm import load_datasets, load_processor, parse_args

    # force: intel_extension_for_pytorch (imported by DeepSpeed on CPU) already set up root logging at WARNING, which
    # would hide the "dataset: kept ..." line this measures the count of
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    script_args, training_args, model_args = parse_args(argv)
    processor = load_processor(model_args)
    before = {"peak_rss_mib": peak_rss_mib(), "cpu_s": cpu_seconds(), "wall": time.monotonic()}

    with MemorySampler() as memory:
        train, held_out, stats = load_datasets(script_args, training_args, processor)

    mine = {
        "process": training_args.process_index,
        "imports_and_processor_s": round(before["wall"] - started, 1),
        "peak_rss_mib_before_preparation": round(before["peak_rss_mib"]),
        "preparation_wall_s": round(time.monotonic() - before["wall"], 1),  # a waiting process's includes the wait
        "preparation_cpu_s": round(cpu_seconds() - before["cpu_s"], 1),  # the work it did itself
        "peak_rss_mib": round(peak_rss_mib()),
        "peak_rss_anon_mib_sampled": memory.peak["RssAnon"],
        "peak_rss_file_mib_sampled": memory.peak["RssFile"],
        "train_rows": len(train),
        "held_out_rows": len(held_out) if held_out is not None else 0,
        "cache_files": sorted(Path(f["filename"]).name for f in train.cache_files),
    }
    everyone = [mine]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
    if training_args.process_index != 0:
        return
    report = {
        "command": " ".join([
            f"HF_DATASETS_CACHE={os.environ.get('HF_DATASETS_CACHE', '~/.cache/huggingface/datasets')}",
            "accelerate launch",
            # the recipe's only DeepSpeed config; without it, a plain multi-process CPU/GPU launch
            "--config_file=code/vlm-grpo/deepspeed_zero3.yaml" if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
            else f"--num_processes {len(everyone)}",
            "scripts/measure_data_prep.py", *sys.argv[1:],
        ]),
        "machine": {**machine(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "versions": {"datasets": datasets.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "dataset": script_args.dataset_name,
        "image_policy": script_args.image_policy,
        "max_image_side": script_args.max_image_side,
        "max_prompt_length": script_args.max_prompt_length,
        "rows": stats.total,
        "kept": stats.kept,
        "kept_fraction": round(stats.kept / stats.total, 4),
        "summary": stats.summary(),
        "processes": everyone,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if result_path:
        Path(result_path).parent.mkdir(parents=True, exist_ok=True)
        Path(result_path).write_text(text + "\n")


if __name__ == "__main__":
    main()
    gc.freeze()  # done: the interpreter's last garbage scan skips what torch holds (as grpo_vlm.py ends, and why)
