#!/usr/bin/env python
"""Merge a GRPO LoRA adapter into its base model: one standalone folder that vLLM and transformers load as is.

After a FlexAI job (`make flexai-fetch CKPT=<id>` downloads the checkpoint into the current folder):

    python scripts/merge_lora.py --adapter <fetched-folder> --output_dir outputs/merged \\
        --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct

Offline, on the tiny model of `make smoke`:

    python scripts/merge_lora.py --adapter outputs/smoke/run --output_dir outputs/smoke/merged

`--adapter` takes the adapter folder itself, a run's output dir (its newest `checkpoint-N/` is used when the final
adapter is absent) or the folder `flexai checkpoint fetch` wrote. `--model_name_or_path` defaults to the base
recorded in the adapter; another base is refused (name and layer shapes are checked). Before saving, the merged
and unmerged models are run on one sample (an image and a question) and their logits must agree within
`--tolerance`, so a merge that changed the model's outputs is never written.

The folder written is "inference ready" for FlexAI (`flexai checkpoint push` then `flexai inference serve`, which
runs vLLM): `config.json` with `architectures` (what FlexAI's checkpoint manager looks for), the weights, the
processor and the chat template. `make flexai-checkpoint-push` runs the same check first:

    python scripts/merge_lora.py --check_inference_ready outputs/merged   # one line per problem, nothing when ready
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code" / "vlm-grpo"))

from adapters import AdapterError, attach_adapter, find_adapter_dir, load_base_model, load_processor, read_adapter_config  # noqa: E402
from path_checks import PathError, check_model_path, check_output_dir  # noqa: E402

logger = logging.getLogger("merge_lora")


class MergeError(RuntimeError):
    """The merged model does not reproduce the adapter model: nothing was saved."""


@dataclass
class MergeArguments:
    adapter: str = field(metadata={"help": "LoRA adapter folder, a training --output_dir (newest checkpoint-N/ is "
                                           "used if the final adapter is missing), or a fetched FlexAI checkpoint."})
    output_dir: str = field(metadata={"help": "Where to write the merged model and processor (vLLM/transformers-ready)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base model (hub id or folder). Default: base_model_name_or_path of the adapter's "
                          "adapter_config.json."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the saved weights: auto (the base's, bfloat16 for Qwen2.5-VL), bfloat16, "
                          "float16 or float32.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    merge_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the merge and the logits check run in; float32 avoids bf16 rounding in W + BA "
                          "(needs 4 bytes per parameter of RAM: 15 GB for the 3B).",
                  "choices": ["bfloat16", "float32"]},
    )
    tolerance: float = field(
        default=1e-4,
        metadata={"help": "Largest accepted max|merged - unmerged| / max|unmerged| over the sample's logits."},
    )
    device: str = field(default="cpu", metadata={"help": "Device for the merge and the check: cpu or cuda."})
    ignore_base_name: bool = field(
        default=False,
        metadata={"help": "Accept a base whose name differs from the adapter's record (a renamed copy); layer "
                          "shapes are still checked."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Write into a non-empty --output_dir."})

    def __post_init__(self):
        if self.tolerance <= 0:
            raise ValueError(f"--tolerance must be positive, got {self.tolerance}")


# ---- stages ---------------------------------------------------------------------------------------------------


def sample_inputs(processor, device: str):
    """One synthetic image question, templated as in training: enough to exercise vision tower and LM together."""
    from data import make_prompt
    from generation import model_inputs
    from synthetic_data import make_synthetic_rows

    rows = make_synthetic_rows(2, seed=0)
    prompts = [make_prompt(p) for p in rows["problem"]]
    return model_inputs(processor, prompts, rows["image"], device)


def logits_of(model, inputs):
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float()


def relative_diff(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def merge(args: MergeArguments) -> dict:
    """Merge, check, save; returns what merge_info.json records."""
    import torch

    adapter_dir = find_adapter_dir(args.adapter)
    recorded_base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    base = args.model_name_or_path or recorded_base
    if not base:
        raise AdapterError(f"{adapter_dir} records no base model: pass --model_name_or_path")
    try:
        check_model_path(base)
    except PathError as err:
        if args.model_name_or_path:
            raise
        # training records the base as its job saw it: a relative path means nothing from another folder or machine
        raise AdapterError(f"{adapter_dir / 'adapter_config.json'} records the base model as {base!r}, which is no "
                           "model folder here: pass --model_name_or_path <the base model's folder or Hub id>") from err
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--output_dir {out} is not empty: pick another folder or pass --overwrite")
    check_output_dir(args.output_dir)  # before the minutes of loading and merging, not after them
    logger.info("adapter %s on base %s", adapter_dir, base)

    model = load_base_model(base, dtype=args.merge_dtype, device=args.device)
    save_dtype = (_config_dtype(base) or torch.bfloat16) if args.dtype == "auto" else getattr(torch, args.dtype)
    model = attach_adapter(model, adapter_dir, base, ignore_base_name=args.ignore_base_name)
    processor = load_processor(adapter_dir, base)
    inputs = sample_inputs(processor, args.device)

    unmerged = logits_of(model, inputs)
    with model.disable_adapter():
        base_logits = logits_of(model, inputs)
    adapter_effect = relative_diff(unmerged, base_logits)
    if adapter_effect == 0:
        logger.warning("the adapter changes no logit on the sample: was it trained (a fresh LoRA has B = 0)?")
    untie_adapted_embeddings(model)
    merged = model.merge_and_unload()
    diff = relative_diff(logits_of(merged, inputs), unmerged)
    logger.info("logits check: merged vs unmerged %.2e (tolerance %.0e); adapter vs base %.2e", diff, args.tolerance, adapter_effect)
    if not diff <= args.tolerance:
        raise MergeError(
            f"merged model's logits differ from the adapter model's by {diff:.2e} (relative), over --tolerance "
            f"{args.tolerance:.0e}: nothing saved. With --merge_dtype bfloat16, try float32."
        )

    out.mkdir(parents=True, exist_ok=True)
    merged.to(save_dtype).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    restore_config_keys(base, out, merged)
    info = {
        "adapter": str(adapter_dir),
        "base_model": base,
        "adapter_recorded_base": recorded_base,
        "saved_dtype": str(save_dtype).replace("torch.", ""),
        "merge_dtype": args.merge_dtype,
        "logits_relative_diff": diff,
        "adapter_effect_relative": adapter_effect,
        "tolerance": args.tolerance,
    }
    problems = inference_ready_problems(out)
    if problems:  # a save that lost a file: say so now, not when the endpoint fails to start
        raise MergeError(f"the merged folder is not inference ready: {problems[0]}")
    info["inference_ready"] = True
    (out / "merge_info.json").write_text(json.dumps(info, indent=2))
    return info


def untie_adapted_embeddings(peft_model) -> None:
    """Give an adapted lm_head its own weight before merging when it is tied to the input embeddings.

    Merging BA into a tied lm_head would change the input embeddings too (peft#2018), and the merged model would
    no longer match the adapter model: the logits check catches that. Untying keeps the merge exact, at the cost
    of a separate lm_head in the saved model (vocab x hidden more parameters)."""
    import torch

    model = peft_model.get_base_model()
    head = model.get_output_embeddings()
    base_layer = getattr(head, "base_layer", None)  # a LoRA-wrapped lm_head
    if base_layer is None or base_layer.weight is not model.get_input_embeddings().weight:
        return
    logger.info("the adapter targets lm_head, tied to the input embeddings: untying before the merge")
    base_layer.weight = torch.nn.Parameter(base_layer.weight.detach().clone(), requires_grad=False)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.tie_word_embeddings = False


def restore_config_keys(base: str, out: Path, model) -> None:
    """Put back the top-level `*_token_id` keys the save dropped. transformers 4.57's Qwen2_5_VLConfig stores
    `image_token_id`, `video_token_id`, `vision_*_token_id` inside text_config when that has them too (its
    __setattr__), so save_pretrained leaves them out of the top level, and a reload resets them to Qwen's ids.
    Harmless for Qwen's checkpoints (same ids), fatal for any other vocabulary, e.g. the tiny test model
    ("Image features and image tokens do not match")."""
    from transformers import AutoConfig
    from transformers.utils import cached_file

    try:
        base_config = json.loads(Path(cached_file(base, "config.json")).read_text())
    except OSError:
        AutoConfig.from_pretrained(base)  # raises the loading error with its own message
        return
    merged_file = out / "config.json"
    merged_config = json.loads(merged_file.read_text())
    missing = {k: v for k, v in base_config.items() if k not in merged_config and k not in ("dtype", "torch_dtype")}
    # the same __setattr__ swallows `architectures` (vLLM picks the model class from it) and `tie_word_embeddings`
    # (False after untie_adapted_embeddings: a reload must not tie lm_head back to the embeddings)
    fixed = {**merged_config, **missing, "architectures": [type(model).__name__],
             "tie_word_embeddings": bool(model.config.tie_word_embeddings)}
    merged_file.write_text(json.dumps(fixed, indent=2, sort_keys=True) + "\n")


# what an OpenAI-compatible server (vLLM) needs besides the weights to answer a chat request with an image
PROCESSOR_FILES = ("preprocessor_config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def inference_ready_problems(folder) -> list[str]:
    """Why `folder` cannot be served as it is, one line each (empty: ready). FlexAI marks a checkpoint "inference
    ready" when its config.json has `architectures` (docs.flex.ai, Inference-ready Checkpoints); vLLM also needs the
    weights, the image processor, the tokenizer and a chat template to turn a chat request into the model's prompt."""
    out = Path(folder)
    if not out.is_dir():
        return [f"{out}: no such folder (make merge writes the merged model)"]
    problems = []
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as err:
        return [f"{out}: no readable config.json ({type(err).__name__}): not a model folder; make merge writes one"]
    if not config.get("architectures"):
        problems.append(f"{out}/config.json has no `architectures`: FlexAI will not mark it inference ready and vLLM "
                        "cannot pick the model class; merge with scripts/merge_lora.py, which writes it")
    if (out / "adapter_config.json").exists():
        problems.append(f"{out} holds a LoRA adapter (adapter_config.json): merge it first (make merge)")
    if not list(out.glob("*.safetensors")) and not list(out.glob("*.bin")):
        problems.append(f"{out} holds no weights (*.safetensors)")
    for name in PROCESSOR_FILES:
        if not (out / name).exists():
            problems.append(f"{out} has no {name}: the image processor is missing")
    if not any((out / name).exists() for name in TOKENIZER_FILES):
        problems.append(f"{out} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    tokenizer_config = out / "tokenizer_config.json"
    has_template = (out / "chat_template.jinja").exists() or (out / "chat_template.json").exists() or (
        tokenizer_config.exists() and "chat_template" in json.loads(tokenizer_config.read_text()))
    if not has_template:
        problems.append(f"{out} has no chat template (chat_template.jinja): chat requests cannot be formatted")
    return problems


def _config_dtype(base: str):
    """The dtype the base ships in (config.json's torch_dtype), so `--dtype auto` saves what vLLM expects."""
    import torch
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(base).torch_dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype


def parse_args(argv: list[str] | None = None) -> MergeArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(MergeArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    # force: intel_extension_for_pytorch (loaded by the CPU build of vLLM) gives the root logger a handler at
    # WARNING, which would silence this script's INFO lines (the data counts, the plan)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    args = parse_args(argv)
    info = merge(args)
    print(json.dumps(info, indent=2))
    print(f"merged model: {args.output_dir}")
    return info


def check_inference_ready(argv: list[str]) -> None:
    """`--check_inference_ready DIR`: print the first problem in one line (nothing when ready); used by
    `make flexai-checkpoint-push` before anything is uploaded."""
    if len(argv) != 1:
        sys.exit("usage: merge_lora.py --check_inference_ready DIR")
    problems = inference_ready_problems(argv[0])
    if problems:
        print(problems[0])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check_inference_ready"]:
        check_inference_ready(sys.argv[2:])
        sys.exit(0)
    try:
        main()
    except (AdapterError, MergeError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
    gc.freeze()  # done: the interpreter's last garbage scan skips what torch holds (as grpo_vlm.py ends, and why)
