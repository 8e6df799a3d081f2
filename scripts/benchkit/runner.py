"""The parent process of the benchmark: the configurations compared, one `accelerate launch` of each (pinned to its
GPUs, killed whole on timeout) while nvidia-smi is polled for peak memory, and bench.json / bench.md written as
results come in."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import ENTRY, RECIPE, REPO
from .report import summarize, table

ACCEL_CONFIG = RECIPE / "deepspeed_zero3.yaml"
HAS_VLLM = importlib.util.find_spec("vllm") is not None

# The seed's grpo_vlm.py flags (experiments/vlm-grpo/README.md), without model and output dir; --max_completion_length
# is set from --completion_length, --use_vllm ... added where vLLM is importable.
SEED_FLAGS = [
    "--learning_rate", "1e-5", "--gradient_checkpointing", "--dtype", "bfloat16",
    "--max_prompt_length", "2048",
    "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
    "--log_completions", "--logging_steps", "200",
]
# 0.3: what the colocate budget in experiments/vlm-grpo/BENCHMARKS.md leaves room for next to ZeRO-3 training.
VLLM_FLAGS = ["--use_vllm", "--vllm_mode", "colocate", "--vllm_gpu_memory_utilization", "0.3"]

# name -> flags added to the seed's. The seed trains 8 completions per GPU per step (2 prompts x 8 generations over 2
# GPUs) and generates them in one batch of 8 per GPU; "tuned" generates 64 per GPU at once (16 per micro-batch x 4
# accumulation steps): transformers' decoding is bound by per-token overhead, so 8x the sequences cost little more
# time, and the larger micro-batch feeds the matrix units better. See experiments/vlm-grpo/BENCHMARKS.md.
CONFIGS = {
    "seed": [],
    # ZeRO-3: attention projections and the vision tower (each < 5 M elements) stay whole on every GPU instead of being
    # all-gathered three times per micro-batch (forward, recomputation, backward); prefetch 50 M elements ahead (about
    # two MLP matrices) instead of accelerate's 3.8 M, less than one.
    "tuned": ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "4",
              "--zero3_param_persistence_threshold", "5000000", "--zero3_prefetch_bucket_size", "50000000"],
}
# The same with TRL's own vLLM-path trainer side (fast_paths.py off): the "before" of issue 11's cuts.
CONFIGS.update({f"{name}-trl": [*flags, "--no_vllm_fast_paths"] for name, flags in list(CONFIGS.items())})


class GpuMemoryPoller:
    """Peak memory.used per GPU as nvidia-smi reports it (context, NCCL buffers and allocator cache included)."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.peak, self._stop = period_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10,
                ).stdout
                for line in out.strip().splitlines():
                    i, used = (int(x) for x in line.split(","))
                    self.peak[i] = max(self.peak.get(i, 0), used)
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def generation_kind(args) -> str:
    if args.vllm_stand_in:
        return "vLLM stand-in (trainer side only: random completions, weight sync into a sink)"
    return "vLLM colocate" if HAS_VLLM else "transformers"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=30).stdout.strip()
        return out.stdout.strip() + (" + uncommitted changes" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        return len([line for line in out.splitlines() if line.startswith("GPU ")])
    except (OSError, subprocess.SubprocessError):
        return 0


def config_argv(name: str, args, model: Path, data: Path, out_dir: Path, gen_yaml: Path) -> list[str]:
    argv = [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out_dir),
        *SEED_FLAGS, "--max_completion_length", str(args.completion_length),
        *(VLLM_FLAGS if HAS_VLLM or args.vllm_stand_in else []),
        *CONFIGS[name],
        "--max_steps", str(args.warmup + args.steps + (1 if name in args.profile_rollout.split(",") else 0)), "--save_strategy", "no", "--report_to", "none",
        "--config", str(gen_yaml),
    ]
    return argv + args.extra


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill the launcher and every rank. Killing the launcher's process group is not enough: torch's elastic agent
    starts each rank in a session of its own, so on the first device run the timed-out seed ranks kept training
    while the next configuration ran beside them on the same GPUs."""
    try:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
    except Exception:  # noqa: BLE001 - psutil missing or the tree already gone: fall back to the group
        pass
    os.killpg(proc.pid, signal.SIGKILL)


def gpu_slices(n_configs: int, num_processes: int, gpus: int, parallel: bool) -> list[list[int]]:
    """Physical GPU indexes of each configuration: all configurations on GPUs 0..num_processes-1 one after another,
    or, with --parallel, each on a disjoint set of num_processes GPUs at the same time."""
    if not parallel:
        return [list(range(num_processes))] * n_configs
    if n_configs * num_processes > gpus:
        raise SystemExit(f"error: --parallel needs {n_configs} configurations x {num_processes} GPUs = "
                         f"{n_configs * num_processes} GPUs, this machine has {gpus}; drop --parallel or "
                         f"pass fewer --configs")
    return [list(range(i * num_processes, (i + 1) * num_processes)) for i in range(n_configs)]


def run_config(name: str, args, model: Path, data: Path, env: dict, gpus: list[int], port: int) -> dict:
    run_dir = Path(args.out) / name
    record_dir = run_dir / "records"
    record_dir.mkdir(parents=True, exist_ok=True)
    for old in record_dir.glob("rank*.jsonl"):
        old.unlink()
    vllm = HAS_VLLM or args.vllm_stand_in
    gen_kwargs = {"min_tokens": args.completion_length} if vllm else {"min_new_tokens": args.completion_length}
    gen_yaml = run_dir / "generation.yaml"
    gen_yaml.write_text(json.dumps({"generation_kwargs": gen_kwargs}) + "\n")  # JSON is YAML
    spec = {"argv": config_argv(name, args, model, data, run_dir / "trainer", gen_yaml), "record_dir": str(record_dir),
            "model": str(model), "vllm_stand_in": args.vllm_stand_in, "completion_length": args.completion_length,
            "profile_step": args.warmup + args.steps + 1 if name in args.profile_rollout.split(",") else None}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    launch = [sys.executable, "-m", "accelerate.commands.launch", f"--config_file={ACCEL_CONFIG}",
              f"--main_process_port={port}"]
    if args.matmul_tflops:  # on a GPU machine: pin this configuration to its GPUs (env has nvidia-smi's numbering)
        env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    if args.num_processes != 2:
        launch += ["--num_processes", str(args.num_processes)]
    cmd = [*launch, str(ENTRY), "--worker", str(spec_path)]
    log_path = Path(args.out) / f"{name}.log"
    print(f"[bench] {name} on GPUs {gpus}: {' '.join(cmd)}\n[bench] {name} script args: {' '.join(spec['argv'])}", flush=True)
    t0 = time.time()
    status = "ok"
    with log_path.open("w") as log, GpuMemoryPoller() as poller:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout_s)
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            proc.wait()
            status = f"timeout after {args.timeout_s} s"
    result = summarize(name, record_dir, args.warmup, args.matmul_tflops, gpus, last=args.warmup + args.steps)
    profile = record_dir / "rollout_profile_rank0.txt"
    if profile.exists():
        result["rollout_profile"] = profile.read_text()
    result.update(status=status, wall_s=round(time.time() - t0, 1), log=str(log_path), script_args=spec["argv"],
                  gpus=gpus, nvidia_smi_peak_mib={i: m for i, m in poller.peak.items() if i in gpus})
    if status != "ok":
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        print(f"[bench] {name}: {status}; log tail:\n" + "\n".join(tail), flush=True)
    return result


def run_benchmark(args) -> None:
    """Build the model and data if missing, measure the GPUs, run each configuration (one after another, or with
    --parallel at once), and write bench.json and bench.md after each."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    gpus = gpu_count()
    args.num_processes = args.num_processes or (2 if args.parallel or not gpus else gpus)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown --configs {unknown}; choose from {sorted(CONFIGS)}")
    slices = gpu_slices(len(names), args.num_processes, gpus, args.parallel and bool(gpus))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    # NVLink multicast stays off (on shared multi-GPU hosts it can put GPUs out of service); harmless elsewhere.
    env.update({k: env.get(k, v) for k, v in
                {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items()})
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's GPU numbers = nvidia-smi's, for --parallel and the memory poller

    t0 = time.time()
    args.matmul_tflops = []
    if gpus:
        res = subprocess.run([sys.executable, str(ENTRY), "--matmul"], capture_output=True, text=True, env=env, check=True)
        args.matmul_tflops = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"[bench] bf16 matmul 8192^3: {args.matmul_tflops}", flush=True)

    model = Path(args.model) if args.model else out / f"model-{args.preset}"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts/make_tiny_model.py"), str(model), "--preset", args.preset,
                        "--device", "cuda" if gpus else "cpu"], check=True, env=env)
    data = out / f"synthetic-{args.image_side}px-{args.rows}"
    if not (data / "dataset_info.json").exists():
        sys.path.insert(0, str(RECIPE))
        from synthetic_data import make_synthetic_dataset

        make_synthetic_dataset(args.rows, seed=0, image_side=args.image_side).save_to_disk(str(data))
    args.vision_tower = None
    if gpus and not args.skip_vision:
        res = subprocess.run([sys.executable, str(ENTRY), "--vision", str(model), "--image_side", str(args.image_side)],
                             capture_output=True, text=True, env=env)
        if res.returncode == 0:
            args.vision_tower = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"[bench] vision tower, 16 images: {args.vision_tower or res.stderr[-2000:]}", flush=True)
    print(f"[bench] model and data ready after {time.time() - t0:.0f} s; generation: "
          f"{generation_kind(args)}; completions fixed at {args.completion_length} tokens", flush=True)

    results: list[dict] = []
    lock = threading.Lock()

    def run_one(i: int, name: str) -> None:
        result = run_config(name, args, model, data, env, slices[i], port=29500 + i)
        with lock:
            results.append(result)
            results.sort(key=lambda r: names.index(r["name"]))
            print(table(results), flush=True)
            report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": sys.argv,
                      "versions": versions(), "matmul_bf16": args.matmul_tflops, "vision_tower": args.vision_tower,
                      "generation": generation_kind(args), "parallel": args.parallel, "commit": git_commit(),
                      "completion_length": args.completion_length, "image_side": args.image_side, "results": results}
            (out / "bench.json").write_text(json.dumps(report, indent=1))
            (out / "bench.md").write_text(table(results) + "\n")
            if args.results_copy_dir:
                copy_dir = Path(args.results_copy_dir)
                copy_dir.mkdir(parents=True, exist_ok=True)
                for name in ("bench.json", "bench.md"):
                    (copy_dir / name).write_bytes((out / name).read_bytes())

    if args.parallel and gpus:
        threads = [threading.Thread(target=run_one, args=(i, n)) for i, n in enumerate(names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, name in enumerate(names):
            run_one(i, name)
    by_name = {r["name"]: r for r in results}
    if by_name.get("seed", {}).get("samples_per_s") and len(results) > 1:
        for r in results:
            if r["name"] != "seed" and r.get("samples_per_s"):
                ratio = r["samples_per_s"] / by_name["seed"]["samples_per_s"]
                print(f"[bench] samples/s {r['name']} / seed = {ratio:.2f}x", flush=True)
    (out / "bench.md").write_text(table(results) + "\n")
