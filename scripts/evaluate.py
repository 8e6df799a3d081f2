#!/usr/bin/env python
"""Did training help? Score the base model and the trained one side by side on held-out questions.

Every reward function of training (code/vlm-grpo/rewards.py, imported, not re-implemented) is averaged over the
completions, plus `accuracy` (answer correct) and `format_rate` (exact `<think>…</think><answer>…</answer>`).
Results go to `--output_dir` as eval.json (numbers), eval.md (a table) and completions-<model>.jsonl.

After a FlexAI job, with the fetched checkpoint (the held-out rows are those the run recorded in its split.json;
a run without one gets the split rebuilt from the dataset arguments and seed given here, the training defaults):

    python scripts/evaluate.py --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct --adapter <fetched-folder> \\
        --output_dir outputs/eval

or with a merged model (scripts/merge_lora.py): `--merged_model outputs/merged`. Offline, on the tiny model of
`make smoke`:

    python scripts/evaluate.py --model_name_or_path outputs/smoke/tiny-qwen2.5-vl --adapter outputs/smoke/run \\
        --dataset_name synthetic --eval_fraction 0.1 --max_new_tokens 32 --output_dir outputs/smoke/eval

`--split all` scores every row of `--dataset_name` instead (any dataset grpo_vlm.py accepts, e.g. a test set of
your own). Generation uses vLLM when it can run here (`--backend auto`: a GPU, or the CPU build of `make vllm-cpu`),
transformers' batched `generate` otherwise; greedy by default (`--temperature 0`).
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code" / "vlm-grpo"))

from adapters import AdapterError, attach_adapter, find_adapter_dir, load_base_model, load_processor  # noqa: E402
from data import IMAGE_POLICIES, SOURCE_INDEX, SPLIT_RECORD, DatasetError, image_column, max_images_per_row  # noqa: E402
from generation import GenerationSettings, hf_generate, vllm_available, vllm_generate  # noqa: E402
from grpo_vlm import VLMGRPOScriptArguments, load_datasets  # noqa: E402
from path_checks import check_model_path, check_output_dir  # noqa: E402
from rewards import ACCURACY_EVENTS, REWARD_FUNCS  # noqa: E402

logger = logging.getLogger("evaluate")

# Training's dataset arguments: the defaults here are the training defaults, so the held-out split matches.
_TRAIN = VLMGRPOScriptArguments()
TRAINING_SEED = 42  # GRPOConfig's (TrainingArguments') default --seed


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "Base model (hub id or folder): scored as `base`, and the "
                                                      "model the --adapter is put on."})
    adapter: str | None = field(
        default=None,
        metadata={"help": "Trained LoRA adapter: its folder, a training --output_dir (newest checkpoint-N/ if the "
                          "final adapter is missing) or a fetched FlexAI checkpoint. Scored as `adapter`."},
    )
    merged_model: str | None = field(
        default=None, metadata={"help": "A merged model folder (scripts/merge_lora.py). Scored as `merged`."}
    )
    skip_base: bool = field(default=False, metadata={"help": "Do not score the base model."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where eval.json, eval.md and completions go."})

    # -- data: the same flags and defaults as grpo_vlm.py, so the held-out split is the training run's --
    dataset_name: str = field(default=_TRAIN.dataset_name, metadata={"help": "As grpo_vlm.py --dataset_name."})
    dataset_config: str | None = field(default=None, metadata={"help": "As grpo_vlm.py --dataset_config."})
    dataset_train_split: str = field(default="train", metadata={"help": "As grpo_vlm.py --dataset_train_split."})
    synthetic_rows: int = field(default=_TRAIN.synthetic_rows, metadata={"help": "As grpo_vlm.py --synthetic_rows."})
    max_train_samples: int | None = field(default=None, metadata={"help": "As grpo_vlm.py --max_train_samples."})
    image_column: str = field(default=_TRAIN.image_column, metadata={"help": "As grpo_vlm.py --image_column."})
    problem_column: str = field(default=_TRAIN.problem_column, metadata={"help": "As grpo_vlm.py --problem_column."})
    solution_column: str = field(default=_TRAIN.solution_column,
                                 metadata={"help": "As grpo_vlm.py --solution_column."})
    max_image_side: int | None = field(default=_TRAIN.max_image_side, metadata={"help": "As grpo_vlm.py --max_image_side."})
    image_policy: str = field(default=_TRAIN.image_policy, metadata={"help": "As grpo_vlm.py --image_policy.",
                                                                     "choices": list(IMAGE_POLICIES)})
    max_prompt_length: int | None = field(default=None, metadata={"help": "As grpo_vlm.py --max_prompt_length."})
    eval_fraction: float = field(default=_TRAIN.eval_fraction, metadata={"help": "As grpo_vlm.py --eval_fraction."})
    seed: int = field(default=TRAINING_SEED, metadata={"help": "As grpo_vlm.py --seed (the split's shuffle); also "
                                                                "seeds sampling, identically for every model."})
    split: str = field(
        default="held_out",
        metadata={"help": "held_out: the rows training held out; all: every row of the dataset.",
                  "choices": ["held_out", "all"]},
    )
    max_samples: int | None = field(default=None, metadata={"help": "Score at most this many questions."})

    # -- generation --
    max_new_tokens: int = field(default=1024, metadata={"help": "Completion length cap (training's "
                                                                "--max_completion_length)."})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; > 0: sampling at this temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (when temperature > 0)."})
    num_samples: int = field(default=1, metadata={"help": "Completions per question (use > 1 with temperature > 0)."})
    batch_size: int = field(default=8, metadata={"help": "Questions per generate call (transformers backend)."})
    backend: str = field(default="auto", metadata={"help": "auto: vLLM if it can run here (GPU, or the CPU build), else transformers.",
                                                   "choices": ["auto", "vllm", "hf"]})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto (bfloat16 on GPU, float32 on CPU), "
                                                         "bfloat16 or float32.",
                                                 "choices": ["auto", "bfloat16", "float32"]})
    ignore_base_name: bool = field(default=False, metadata={"help": "Accept a base whose name differs from the "
                                                                    "adapter's record (shapes are still checked)."})
    no_progress: bool = field(default=False, metadata={"help": "No progress bar."})
    backend_used: str = field(default="", init=False)  # what --backend resolved to (not a flag)

    def __post_init__(self):
        if not self.adapter and not self.merged_model and self.skip_base:
            raise ValueError("nothing to score: --skip_base without --adapter or --merged_model")
        if self.num_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--num_samples, --batch_size and --max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError("--num_samples > 1 with greedy decoding (--temperature 0) repeats one completion: "
                             "set --temperature")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max_samples must be >= 1, got {self.max_samples}")

    @property
    def generation(self) -> GenerationSettings:
        return GenerationSettings(self.max_new_tokens, self.temperature, self.top_p, self.num_samples, self.batch_size)


# ---- data -----------------------------------------------------------------------------------------------------


def data_arguments(args: EvalArguments, eval_fraction: float):
    """grpo_vlm.py's data arguments with this evaluation's values: the same loading and filters as training."""
    return replace(
        _TRAIN,
        dataset_name=args.dataset_name,
        dataset_config=args.dataset_config,
        dataset_train_split=args.dataset_train_split,
        synthetic_rows=args.synthetic_rows,
        max_train_samples=args.max_train_samples,
        image_column=args.image_column,
        problem_column=args.problem_column,
        solution_column=args.solution_column,
        max_image_side=args.max_image_side,
        image_policy=args.image_policy,
        max_prompt_length=args.max_prompt_length,
        eval_fraction=eval_fraction,
    )


def find_split_record(adapter_dir: Path | None) -> dict | None:
    """The split the training run recorded (grpo_vlm.py writes split.json into its output dir and every checkpoint)."""
    for folder in (adapter_dir, adapter_dir.parent) if adapter_dir else ():
        path = folder / SPLIT_RECORD
        if path.is_file():
            return json.loads(path.read_text())
    return None


def load_eval_rows(args: EvalArguments, processor, adapter_dir: Path | None = None):
    """The rows to score: grpo_vlm.py's own loading and filtering; the held-out rows are those the training run
    recorded (split.json beside the adapter), else the split is re-derived from the run's arguments."""
    record = find_split_record(adapter_dir) if args.split == "held_out" else None
    if record is not None:
        if record["dataset_name"] != args.dataset_name:
            raise DatasetError(f"the run at {adapter_dir} trained on {record['dataset_name']!r}, not "
                               f"{args.dataset_name!r}: pass --dataset_name {record['dataset_name']}")
        columns = {"image": args.image_column, "problem": args.problem_column, "solution": args.solution_column}
        if record.get("columns", columns) != columns:
            flags = " ".join(f"--{part}_column {name}" for part, name in record["columns"].items())
            raise DatasetError(f"the run at {adapter_dir} read its rows from other columns: pass {flags}")
        return _recorded_held_out_rows(args, processor, record)
    script_args = data_arguments(args, eval_fraction=args.eval_fraction if args.split == "held_out" else 0.0)
    if args.split == "held_out" and args.eval_fraction <= 0:
        raise DatasetError("--split held_out needs --eval_fraction > 0 (the training run's); use --split all to "
                           "score the whole dataset")
    train, held_out, stats = load_datasets(script_args, SimpleNamespace(seed=args.seed), processor)
    rows = held_out if args.split == "held_out" else train
    if args.max_samples is not None and len(rows) > args.max_samples:
        rows = rows.select(range(args.max_samples))
    if args.split == "held_out":
        logger.warning("no %s beside the adapter: the held-out split is re-derived from the arguments given here, "
                       "which must be the training run's (a different filter or seed shifts it)", SPLIT_RECORD)
    logger.info("scoring %d rows (%s split of %s; %s)", len(rows), args.split, args.dataset_name, stats.summary())
    return rows


def _recorded_held_out_rows(args: EvalArguments, processor, record: dict):
    """Every row the data filters keep, narrowed to the source rows the run held out (a filter here that drops more
    than training did can only remove held-out rows, never add training ones)."""
    rows, _, stats = load_datasets(data_arguments(args, eval_fraction=0.0), SimpleNamespace(seed=record["seed"]), processor)
    held_out = set(record["held_out_source_indices"])
    rows = rows.filter(lambda i: i in held_out, input_columns=SOURCE_INDEX)
    if args.max_samples is not None and len(rows) > args.max_samples:
        rows = rows.select(range(args.max_samples))
    logger.info("scoring %d of the run's %d held-out rows (%s; %s)", len(rows), len(held_out), args.dataset_name,
                stats.summary())
    return rows


# ---- scoring --------------------------------------------------------------------------------------------------


def score_completions(completions: list[list[str]], rows) -> dict:
    """Mean of every registered reward over all completions, plus accuracy and format rate, per rewards.py.

    Rewards get what TRL gives them in training: conversational completions and the dataset's columns, one entry
    per completion."""
    flat, columns = [], {c: [] for c in rows.column_names if c not in ("prompt", "image", "images")}
    for i, samples in enumerate(completions):
        for text in samples:
            flat.append([{"role": "assistant", "content": text}])
            for c in columns:
                columns[c].append(rows[i][c])
    if not flat:
        raise DatasetError("no completions to score")
    scores = {}
    timeouts_before = ACCURACY_EVENTS["timeout"]
    for name, func in REWARD_FUNCS.items():
        values = func(flat, **columns)
        scores[name] = sum(values) / len(values)
    scores["format_rate"] = scores["format"]
    # answers math-verify ran out of time on, scored 0.0 in `accuracy`: when not 0, accuracy is a lower bound
    scores["accuracy_timeouts"] = ACCURACY_EVENTS["timeout"] - timeouts_before
    scores["completions"] = len(flat)
    return scores


def generate_all(args: EvalArguments, label: str, model_or_llm, processor, rows, lora_request=None) -> list[list[str]]:
    import torch

    prompts, images = rows["prompt"], rows[image_column(rows)]
    torch.manual_seed(args.seed)  # the same sampling noise for every model: a paired comparison
    if args.backend_used == "vllm":
        return vllm_generate(model_or_llm, processor, prompts, images, args.generation, lora_request=lora_request)
    from tqdm.auto import tqdm

    with tqdm(total=len(prompts), desc=f"generating ({label})", unit="question", disable=args.no_progress) as bar:
        return hf_generate(model_or_llm, processor, prompts, images, args.generation, progress=bar.update)


def evaluate(args: EvalArguments) -> dict:
    """Score each requested model; returns (and writes) the report."""
    import torch

    check_model_path(args.model_name_or_path)
    adapter_dir = find_adapter_dir(args.adapter) if args.adapter else None
    if args.merged_model and not (Path(args.merged_model) / "config.json").is_file():
        raise AdapterError(f"--merged_model {args.merged_model} has no config.json: pass the folder merge_lora.py wrote")
    check_output_dir(args.output_dir)  # the report is written after every model has generated: fail now, not then
    args.backend_used = _pick_backend(args.backend)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = load_processor(args.model_name_or_path)
    rows = load_eval_rows(args, processor, adapter_dir)
    if len(rows) == 0:
        raise DatasetError(f"no rows to score in {args.dataset_name} ({args.split} split)")

    completions: dict[str, list[list[str]]] = {}
    models: dict[str, str] = {}
    if args.backend_used == "vllm":
        completions, models = _run_vllm(args, processor, rows, adapter_dir, dtype)
    else:
        if not args.skip_base or adapter_dir:
            model = load_base_model(args.model_name_or_path, dtype=dtype, device=device)
            if not args.skip_base:
                completions["base"] = generate_all(args, "base", model, processor, rows)
                models["base"] = args.model_name_or_path
            if adapter_dir:
                model = attach_adapter(model, adapter_dir, args.model_name_or_path, args.ignore_base_name)
                completions["adapter"] = generate_all(args, "adapter", model, processor, rows)
                models["adapter"] = str(adapter_dir)
            del model
        if args.merged_model:
            model = load_base_model(args.merged_model, dtype=dtype, device=device)
            completions["merged"] = generate_all(args, "merged", model, processor, rows)
            models["merged"] = args.merged_model
            del model

    report = {
        "dataset": args.dataset_name,
        "split": args.split,
        "questions": len(rows),
        "generation": {**asdict(args.generation), "backend": args.backend_used, "dtype": dtype},
        "models": {label: {"path": models[label], "scores": score_completions(c, rows)} for label, c in completions.items()},
    }
    if "base" in report["models"]:
        base = report["models"]["base"]["scores"]
        for label, entry in report["models"].items():
            if label != "base":
                entry["delta_vs_base"] = {k: entry["scores"][k] - base[k] for k in metric_names()}
    write_report(args, report, completions, rows)
    return report


def _pick_backend(backend: str) -> str:
    if backend == "hf":
        return "hf"
    available = vllm_available()
    if backend == "vllm" and not available:
        raise ValueError("--backend vllm: vLLM cannot run here (not installed, or its CUDA build without a GPU; "
                         "`make vllm-cpu` builds it for CPU); use --backend hf")
    return "vllm" if available else "hf"


# Modules vLLM 0.11.0 cannot put a LoRA on for Qwen2.5-VL (its model declares no embedding modules for LoRA):
# such an adapter is merged first (scripts/merge_lora.py) and its merged model scored as `adapter`.
VLLM_LORA_UNSUPPORTED = ("lm_head", "embed_tokens")


def _merge_for_vllm(args, adapter_dir: Path) -> str:
    import merge_lora

    out = Path(args.output_dir) / "adapter-merged-for-vllm"
    logger.info("%s adapts %s, which vLLM's LoRA cannot serve: scoring it merged (%s)", adapter_dir,
                "/".join(VLLM_LORA_UNSUPPORTED), out)
    merge_args = ["--adapter", str(adapter_dir), "--output_dir", str(out), "--model_name_or_path", args.model_name_or_path]
    merge_lora.main([*merge_args, *(["--ignore_base_name"] if args.ignore_base_name else [])])
    return str(out)


def _run_vllm(args, processor, rows, adapter_dir, dtype):
    """Base and adapter from one engine (the adapter as a LoRA request), the merged model from a second one."""
    import gc
    import os

    import torch

    from adapters import check_base_name, read_adapter_config
    from vllm_colocate import cpu_thread_binding_workaround

    # One engine in this process, no engine-core subprocess: nothing to gain for offline scoring, and it works from
    # any caller (tests, notebooks) without a __main__ guard.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cpu_thread_binding_workaround()  # CPU build only: the engine shares this process's cores (fix ledger M9)
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    completions, models = {}, {}
    engine_kwargs = dict(dtype=dtype, limit_mm_per_prompt={"image": max_images_per_row(rows)}, seed=args.seed,
                         gpu_memory_utilization=0.8)
    merged_adapter = None
    if adapter_dir:
        targets = read_adapter_config(adapter_dir).get("target_modules") or []
        if any(t in VLLM_LORA_UNSUPPORTED for t in ([targets] if isinstance(targets, str) else targets)):
            merged_adapter = _merge_for_vllm(args, adapter_dir)
    if not args.skip_base or (adapter_dir and not merged_adapter):
        lora_kwargs = {}
        if adapter_dir and not merged_adapter:
            if not args.ignore_base_name:
                check_base_name(adapter_dir, args.model_name_or_path)
            rank = int(read_adapter_config(adapter_dir).get("r", 16))
            # vLLM accepts only these max_lora_rank values
            max_rank = min(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)
            lora_kwargs = dict(enable_lora=True, max_lora_rank=max_rank)
        llm = LLM(model=args.model_name_or_path, **engine_kwargs, **lora_kwargs)
        if not args.skip_base:
            completions["base"] = generate_all(args, "base", llm, processor, rows)
            models["base"] = args.model_name_or_path
        if adapter_dir and not merged_adapter:
            completions["adapter"] = generate_all(args, "adapter", llm, processor, rows,
                                                  lora_request=LoRARequest("adapter", 1, str(adapter_dir)))
            models["adapter"] = str(adapter_dir)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    if merged_adapter:
        llm = LLM(model=merged_adapter, **engine_kwargs)
        completions["adapter"] = generate_all(args, "adapter", llm, processor, rows)
        models["adapter"] = f"{adapter_dir} (merged for vLLM: {merged_adapter})"
        del llm
        gc.collect()
    if args.merged_model:
        llm = LLM(model=args.merged_model, **engine_kwargs)
        completions["merged"] = generate_all(args, "merged", llm, processor, rows)
        models["merged"] = args.merged_model
    return completions, models


# ---- report ---------------------------------------------------------------------------------------------------


def metric_names() -> list[str]:
    """Table rows, in order: the headline numbers, then every reward of the registry."""
    return ["accuracy", "format_rate", *[n for n in REWARD_FUNCS if n not in ("accuracy", "format")]]


def markdown_table(report: dict) -> str:
    labels = list(report["models"])
    header = ["metric", *labels] + [f"{label} − base" for label in labels if label != "base" and "base" in labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in metric_names():
        cells = [f"{report['models'][label]['scores'][metric]:.3f}" for label in labels]
        cells += [f"{report['models'][label]['delta_vs_base'][metric]:+.3f}" for label in labels
                  if label != "base" and "base" in labels]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    gen = report["generation"]
    caption = (f"{report['questions']} questions ({report['split']} split of `{report['dataset']}`), "
               f"{gen['num_samples']} completion(s) each, temperature {gen['temperature']}, "
               f"max {gen['max_new_tokens']} new tokens, {gen['backend']} backend. Rewards: code/vlm-grpo/rewards.py.")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def write_report(args: EvalArguments, report: dict, completions: dict, rows) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    (out / "eval.md").write_text(markdown_table(report))
    for label, samples in completions.items():
        with open(out / f"completions-{label}.jsonl", "w") as f:
            for i, texts in enumerate(samples):
                f.write(json.dumps({"problem": rows[i]["problem"], "solution": rows[i]["solution"],
                                    "completions": texts}) + "\n")


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EvalArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    # force: intel_extension_for_pytorch (loaded by the CPU build of vLLM) gives the root logger a handler at
    # WARNING, which would silence this script's INFO lines (the data counts, the plan)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    args = parse_args(argv)
    report = evaluate(args)
    print(markdown_table(report))
    print(f"written: {Path(args.output_dir) / 'eval.json'}, {Path(args.output_dir) / 'eval.md'}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (AdapterError, DatasetError, ValueError) as err:
        sys.exit(f"error: {err}")
    gc.freeze()  # done: the interpreter's last garbage scan skips what torch holds (as grpo_vlm.py ends, and why)
