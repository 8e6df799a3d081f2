"""Trainer checkpoints that survive faults: found wherever FlexAI mounts them, checked whole before use, written so a
partial one never carries a checkpoint's name, and a graceful stop on SIGTERM/SIGINT.

Why each piece exists (seen on CPU, issue 14): a run killed while saving left `checkpoint-4` without
`trainer_state.json` and with a cut `adapter_model.safetensors`; the next run took it as the newest checkpoint and died
with `SafetensorError: ... invalid header length`, and so would every restart. Here:

- saves go to `output_dir/.partial-checkpoint-N/checkpoint-N` and are renamed to `output_dir/checkpoint-N` by the first
  process only after every process has written every file (`CrashConsistentSaveMixin`). A hidden folder is never
  taken for a checkpoint (HF's `get_last_checkpoint` and rotation match `checkpoint-N` names only);
- before resuming, `checkpoint_problem` checks the trainer state, the weights, the optimizer/scheduler/RNG files and,
  for DeepSpeed, one optimizer shard per process of *this* run; a damaged checkpoint is named in one line and the
  newest whole one is used; nothing is deleted;
- ZeRO-3 optimizer shards are per process: a checkpoint saved by another process count is refused in one line that
  names `--resume_weights_only` (adapter weights, step count and LR schedule kept, fresh optimizer);
- `GracefulStop` turns SIGTERM/SIGINT into "save at the end of this step, then stop"; the script then exits with
  128 + the signal number (143 for SIGTERM, 130 for SIGINT).

Test-only hook: `VLM_GRPO_FAULT=<rank>:<point>` makes process <rank> SIGKILL itself at a named point of a save
(`FAULT_POINTS`), the way a preempted node dies; tests/test_faults.py uses it. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger("grpo_vlm")

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
RUN_ARGS = "run_args.json"
STAGING_PREFIX = ".partial-"  # output_dir/.partial-checkpoint-N/ while checkpoint-N is written
MOVED_ASIDE = "previous-"  # `--resume fresh` moves an old run into output_dir/previous-K/
FAULT_ENV = "VLM_GRPO_FAULT"
FAULT_POINTS = ("save_start", "before_optimizer", "after_files", "before_rename")
# How deep the input checkpoint mount is searched: /input-checkpoint/<name>/grpo-.../checkpoint-N is 3 levels.
INPUT_SEARCH_DEPTH = 3


class CheckpointError(ValueError):
    """No usable checkpoint where one is required, or one this run cannot resume: the message says what to do."""


# ---- finding ----------------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    path: Path
    step: int  # global_step from trainer_state.json, or the folder's number when the state is unreadable
    source: str  # "input checkpoint" or "output_dir": the output_dir wins a tie (the job's own newer progress)


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _is_checkpoint_dir(folder: Path) -> bool:
    return bool(CHECKPOINT_NAME.match(folder.name)) or (folder / TRAINER_STATE).is_file()


def saved_step(folder: Path) -> int:
    try:
        return int(json.loads((folder / TRAINER_STATE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = CHECKPOINT_NAME.match(folder.name)
        return int(match.group(1)) if match else -1


def checkpoint_dirs(root: str | Path | None, depth: int) -> list[Path]:
    """Folders under `root` that look like trainer checkpoints (named `checkpoint-N` or holding trainer_state.json):
    root itself, then down to `depth` levels of named folders. Hidden folders (partial saves) and `previous-*`
    (runs moved aside by `--resume fresh`) are skipped; a checkpoint's own subfolders are not searched."""
    if not root or not Path(root).is_dir():
        return []
    root = Path(root)
    if (root / TRAINER_STATE).is_file():
        return [root]
    found, frontier = [], [root]
    for _ in range(depth):
        nxt = []
        for folder in frontier:
            for child in _visible_dirs(folder):
                if child.name.startswith(MOVED_ASIDE):
                    continue
                (found if _is_checkpoint_dir(child) else nxt).append(child)
        frontier = nxt
    return found


def candidates(output_dir: str | None, input_dir: str | None) -> list[Candidate]:
    """Every checkpoint of the input mount (searched deep: FlexAI layouts) and of output_dir (its own `checkpoint-N`
    only), newest first."""
    found = [Candidate(p, saved_step(p), "input checkpoint") for p in checkpoint_dirs(input_dir, INPUT_SEARCH_DEPTH)]
    found += [Candidate(p, saved_step(p), "output_dir") for p in checkpoint_dirs(output_dir, 1)]
    unique = {c.path.resolve(): c for c in found}  # output_dir inside the mount: once
    return sorted(unique.values(), key=lambda c: (c.step, c.source == "output_dir"), reverse=True)


def describe_folder(folder: str | None, limit: int = 12) -> str:
    """`path (holds: a/, b/c/, x.txt)`: what a mount holds, two levels deep, for the "nothing found" line."""
    if not folder:
        return "(not set)"
    path = Path(folder)
    if not path.is_dir():
        return f"{folder} (does not exist)"
    entries = []
    for child in sorted(path.iterdir(), key=lambda p: (not p.is_dir(), p.name)):  # folders first
        entries.append(child.name + ("/" if child.is_dir() else ""))
        if child.is_dir():
            entries += [f"{child.name}/{g.name}" + ("/" if g.is_dir() else "") for g in sorted(child.iterdir())[:4]]
    shown = ", ".join(entries[:limit]) + (f", ... ({len(entries) - limit} more)" if len(entries) > limit else "")
    return f"{folder} (holds: {shown or 'nothing'})"


# ---- checking ---------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    what: str
    other_world_size: bool = False  # whole, but written by another process count (or without DeepSpeed)


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip whose directory sits at the end: a cut file no longer opens. Cheap (no tensors)."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"{path.name} is unreadable ({err})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:  # safe_open checks the header against the file size: a truncated file fails here
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                return f"{path.name} holds no tensors"
    except Exception as err:  # noqa: BLE001  (SafetensorError and OSError both mean "not usable")
        return f"{path.name} is unreadable ({str(err).splitlines()[0]})"
    return None


def deepspeed_shards(folder: Path) -> tuple[str | None, dict[str, set[int]]]:
    """(tag from `latest`, {"optim": ranks, "model": ranks}) of a DeepSpeed checkpoint folder."""
    tag = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else None
    ranks: dict[str, set[int]] = {"optim": set(), "model": set()}
    if tag and (folder / tag).is_dir():
        for shard in (folder / tag).iterdir():
            match = re.match(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$", shard.name)
            if match:
                ranks[match.group(2)].add(int(match.group(1)))
    return tag, ranks


def checkpoint_problem(folder: str | Path, world_size: int | None = None,
                       deepspeed: bool | None = True) -> Problem | None:
    """What keeps `folder` from being resumed by a run of `world_size` processes (None: it is whole).

    Checks, in order: trainer_state.json parses with a global_step; the weights (adapter or model safetensors) read
    back whole; the DeepSpeed checkpoint (`latest`, then one optimizer and one model shard per process, each a
    readable file) or, without DeepSpeed, optimizer.pt; scheduler.pt and each process's RNG file. `world_size` None
    and `deepspeed` None skip the checks against the current run."""
    folder = Path(folder)
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
        int(state["global_step"])
    except FileNotFoundError:
        return Problem(f"{TRAINER_STATE} is missing")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return Problem(f"{TRAINER_STATE} is unreadable ({type(err).__name__}: {err})")
    weights = sorted(folder.glob("adapter_model.safetensors")) or sorted(folder.glob("model*.safetensors"))
    if not weights:
        return Problem("no adapter_model.safetensors (nor model*.safetensors) in it")
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return Problem(problem)
    if weights[0].name.startswith("adapter") and not (folder / "adapter_config.json").is_file():
        return Problem("adapter_config.json is missing")
    tag, ranks = deepspeed_shards(folder)
    has_ds = tag is not None or any(folder.glob("global_step*"))
    if has_ds:
        if tag is None:
            return Problem("DeepSpeed's `latest` file is missing")
        if not (folder / tag).is_dir():
            return Problem(f"`latest` names {tag}/, which is missing")
        saved = ranks["optim"] | ranks["model"]
        expected = set(range(max(saved) + 1)) if saved else set()
        if not ranks["optim"] or ranks["optim"] != expected or ranks["model"] != expected:
            missing = sorted(f"{kind} shard of rank {r}" for kind in ("optim", "model") for r in expected - ranks[kind])
            return Problem(f"{tag}/ lacks {', '.join(missing) or 'its optimizer shards'}")
        for shard in sorted((folder / tag).glob("*_states.pt")):
            problem = _torch_file_problem(shard)
            if problem:
                return Problem(f"{tag}/{problem}")
        if deepspeed is False:  # None: either is fine (a dry run, a lookup)
            return Problem(f"saved by DeepSpeed ({len(expected)} processes), resumed without it", other_world_size=True)
        if world_size is not None and len(expected) != world_size:
            return Problem(f"saved by {len(expected)} processes (ZeRO-3 optimizer shards are per process), this run "
                           f"has {world_size}", other_world_size=True)
    else:
        problem = _torch_file_problem(folder / "optimizer.pt")
        if problem:
            return Problem(problem)
        if deepspeed:
            return Problem("saved without DeepSpeed (optimizer.pt, no global_step*/ shards), resumed with it",
                           other_world_size=True)
    # The HF Trainer loads scheduler.pt on every resume (DeepSpeed too, with HF's scheduler, the recipe's); each
    # process reads its own RNG file (rng_state_<rank>.pth, or rng_state.pth for one process).
    processes = len(ranks["optim"]) if has_ds else 1
    rng = ["rng_state.pth"] if processes == 1 else [f"rng_state_{r}.pth" for r in range(processes)]
    for extra in ["scheduler.pt", *rng]:
        problem = _torch_file_problem(folder / extra)
        if problem:
            return Problem(problem)
    return None


# ---- choosing -----------------------------------------------------------------------------------------------------


@dataclass
class ResumeChoice:
    path: str | None = None
    step: int | None = None
    weights_only: bool = False
    skipped: list[str] = field(default_factory=list)  # "path: what is wrong", newest first


def choose_checkpoint(output_dir, input_dir, world_size, deepspeed, weights_only=False) -> ResumeChoice:
    """The newest whole checkpoint across the input mount and output_dir. A damaged one is skipped (named in
    `skipped`); a whole one of another process count stops the search: refused unless `weights_only`."""
    choice = ResumeChoice()
    for cand in candidates(output_dir, input_dir):
        problem = checkpoint_problem(cand.path, world_size, deepspeed)
        if problem is None:
            return ResumeChoice(str(cand.path), cand.step, False, choice.skipped)
        if problem.other_world_size:
            if weights_only:
                return ResumeChoice(str(cand.path), cand.step, True, choice.skipped)
            raise CheckpointError(
                f"cannot resume {cand.path} (step {cand.step}): {problem.what}. Resume with the same process count, "
                "or add --resume_weights_only to start from its adapter weights with a fresh optimizer (step count "
                "and LR schedule kept)"
            )
        choice.skipped.append(f"{cand.path}: {problem.what}")
    return choice


def check_explicit_checkpoint(path: str, world_size, deepspeed, weights_only=False) -> ResumeChoice:
    """--resume_from_checkpoint PATH: the user chose it, so a problem is an error, not a fallback."""
    if not Path(path).is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {path}: no such folder")
    problem = checkpoint_problem(path, world_size, deepspeed)
    if problem and problem.other_world_size and weights_only:
        return ResumeChoice(path, saved_step(Path(path)), True)
    if problem and problem.other_world_size:
        raise CheckpointError(f"cannot resume {path}: {problem.what}. Resume with the same process count, or add "
                              "--resume_weights_only to start from its adapter weights with a fresh optimizer")
    if problem:
        raise CheckpointError(f"--resume_from_checkpoint {path} is not a whole checkpoint: {problem.what}")
    return ResumeChoice(path, saved_step(Path(path)))


# ---- the arguments a run was trained with ---------------------------------------------------------------------------

# What changes the trained weights: optimisation, batch, sampling, objective, model, adapter, data, rewards. Left out
# on purpose: how long (max_steps, num_train_epochs: raising them is how a run is trained longer), where and how
# often things are written or logged, memory/speed knobs (vLLM, ZeRO-3, checkpointing) and the process count
# (checked against the optimizer shards instead; so generation_batch_size, which GRPOConfig derives from the process
# count, is compared through steps_per_generation).
TRAINING_FIELDS = {
    "script": ("dataset_name", "dataset_config", "dataset_train_split", "max_prompt_length", "max_image_side",
               "image_policy", "eval_fraction", "synthetic_rows", "max_train_samples", "reward_funcs",
               "system_prompt"),
    "training": ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps",
                 "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "max_grad_norm",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed",
                 "num_generations", "steps_per_generation", "max_completion_length", "temperature", "top_p",
                 "top_k", "min_p", "repetition_penalty", "beta", "epsilon", "epsilon_high", "loss_type",
                 "scale_rewards", "reward_weights", "num_iterations", "mask_truncated_completions", "bf16"),
    "model": ("model_name_or_path", "model_revision", "dtype", "use_peft", "lora_r", "lora_alpha", "lora_dropout",
              "lora_target_modules", "lora_modules_to_save", "use_rslora", "use_dora"),
}


def training_signature(script_args, training_args, model_args) -> dict:
    """The arguments that change training, JSON-ready; saved as run_args.json in output_dir and every checkpoint."""
    sources = {"script": script_args, "training": training_args, "model": model_args}
    values = {name: getattr(sources[kind], name, None) for kind, names in TRAINING_FIELDS.items() for name in names}
    return json.loads(json.dumps(values, default=str))


def signature_diff(saved: dict, current: dict) -> str:
    """`learning_rate 0.001 -> 1e-05, seed 42 -> 7`: the fields both record and that differ ('' if none)."""
    changed = [k for k in current if k in saved and saved[k] != current[k]]
    return ", ".join(f"{k} {json.dumps(saved[k])} -> {json.dumps(current[k])}" for k in changed)


def read_signature(folder: str | Path | None) -> dict | None:
    try:
        return json.loads((Path(folder) / RUN_ARGS).read_text()) if folder else None
    except (OSError, ValueError):
        return None


def holds_a_run(output_dir: str | Path) -> bool:
    out = Path(output_dir)
    return out.is_dir() and (
        (out / RUN_ARGS).exists() or (out / "adapter_model.safetensors").exists() or bool(checkpoint_dirs(out, 1))
    )


def move_run_aside(output_dir: str | Path) -> Path | None:
    """`--resume fresh`: every visible entry of output_dir moves into output_dir/previous-K (renames on one file
    system: nothing copied, nothing deleted). Hidden entries and earlier previous-* stay."""
    out = Path(output_dir)
    if not holds_a_run(out):
        return None
    k = 1
    while (out / f"{MOVED_ASIDE}{k}").exists():
        k += 1
    target = out / f"{MOVED_ASIDE}{k}"
    target.mkdir()
    for entry in sorted(out.iterdir()):
        if entry == target or entry.name.startswith((".", MOVED_ASIDE)):
            continue
        entry.rename(target / entry.name)
    return target


# ---- saving -------------------------------------------------------------------------------------------------------


def maybe_fault(point: str, process_index: int) -> None:
    """Test-only: `VLM_GRPO_FAULT=<rank>:<point>` SIGKILLs that process here (no cleanup, like a lost node)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank, _, where = spec.partition(":")
    if where == point and int(rank) == process_index:
        print(f"{FAULT_ENV}: rank {process_index} SIGKILLs itself at {point}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CrashConsistentSaveMixin:
    """Trainer mixin (before GRPOTrainer in the bases): checkpoint-N appears only once every process wrote every file.

    HF's `_save_checkpoint` (transformers 4.57) writes model, DeepSpeed shards (each process its own), scheduler, RNG
    files and trainer_state.json into `_get_output_dir()/checkpoint-N`, then rotates. Here `_get_output_dir` points at
    the hidden `output_dir/.partial-checkpoint-N` during the save; the run's extra files (`checkpoint_extra_files`:
    split record, run arguments) are added; after a barrier the first process renames the folder into place (an
    atomic rename on one file system), and rotation (`save_total_limit`) runs on the real output_dir afterwards.
    A final name that already exists (a damaged checkpoint the run fell back from) is moved aside, not deleted."""

    checkpoint_extra_files: dict[str, str] = {}
    weights_only_resume: bool = False
    _staging_parent: str | None = None

    def _get_output_dir(self, trial):
        return self._staging_parent or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging_parent, final = run_dir / f"{STAGING_PREFIX}{name}", run_dir / name
        rank = self.args.process_index
        maybe_fault("save_start", rank)
        if self.args.should_save and staging_parent.exists():  # left by a save that crashed at this same step
            staging_parent.rename(run_dir / f"{STAGING_PREFIX}{name}.crashed-{int(time.time())}")
        self.accelerator.wait_for_everyone()  # nobody writes into the staging folder before it is fresh
        self._staging_parent = str(staging_parent)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_parent = None
        staged = staging_parent / name
        if self.args.should_save:
            for filename, text in self.checkpoint_extra_files.items():
                (staged / filename).write_text(text)
        if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(str(staging_parent)):
            self.state.best_model_checkpoint = str(final)
        maybe_fault("after_files", rank)
        self.accelerator.wait_for_everyone()  # every process has written its shards and RNG file
        maybe_fault("before_rename", rank)
        if rank == 0:
            self._publish(staged, final)
        self.accelerator.wait_for_everyone()
        if rank != 0 and self.args.local_process_index == 0 and staged.exists():
            self._publish(staged, final)  # another node without a shared file system: its own copy
        if self.args.should_save:  # by step number, not mtime: a re-saved checkpoint-N must not look newest
            self._rotate_checkpoints(use_mtime=False, output_dir=str(run_dir))

    @staticmethod
    def _publish(staged: Path, final: Path) -> None:
        if final.exists():
            aside = final.parent / f".{final.name}.replaced-{int(time.time())}"
            final.rename(aside)
            logger.warning("%s existed (a checkpoint this run fell back from): moved to %s", final, aside)
        for path in staged.rglob("*"):  # the data is on disk before the name says "whole"
            if path.is_file():
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        staged.rename(final)
        staged.parent.rmdir()
        _fsync_dir(final.parent)

    def _save_optimizer_and_scheduler(self, output_dir):
        maybe_fault("before_optimizer", self.args.process_index)
        return super()._save_optimizer_and_scheduler(output_dir)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if not (self.weights_only_resume and resume_from_checkpoint):
            return super().train(resume_from_checkpoint, *args, **kwargs)
        # Weights only: the adapter goes into the model before DeepSpeed wraps it (LoRA layers are still whole
        # tensors then), trainer state, scheduler and step count come from the checkpoint, DeepSpeed's per-process
        # optimizer shards are not read (transformers calls deepspeed_load_checkpoint unconditionally on resume).
        load_adapter_weights(self.model, resume_from_checkpoint)
        import transformers.trainer as hf_trainer

        original = hf_trainer.deepspeed_load_checkpoint
        hf_trainer.deepspeed_load_checkpoint = lambda *a, **k: None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            hf_trainer.deepspeed_load_checkpoint = original


def load_adapter_weights(model, checkpoint: str) -> int:
    """Load a checkpoint's LoRA adapter into a PEFT model; the number of tensors loaded. Every adapter tensor of
    the file must land (a wrong base model or LoRA config would otherwise train from a half-loaded adapter)."""
    import contextlib

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(checkpoint) / "adapter_model.safetensors"))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):  # already partitioned by ZeRO-3: write whole, re-shard on exit
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gathered:
        result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"{checkpoint}: {len(unexpected)} adapter tensors fit no LoRA layer of this model "
                              f"(e.g. {unexpected[0]}): same --model_name_or_path and LoRA arguments as the saved run?")
    logger.info("weights only: %d adapter tensors loaded from %s; fresh optimizer, step count kept", len(state),
                checkpoint)
    return len(state)


# ---- graceful stop ------------------------------------------------------------------------------------------------


class GracefulStop(TrainerCallback):
    """SIGTERM/SIGINT: finish the current step, save a checkpoint, stop. Every process must take the same decision
    at the same step (a save is collective under ZeRO-3), so the flag is max-reduced across processes at each step
    end; one process being signalled is enough. A second SIGINT stops at once (KeyboardInterrupt).

    Under `accelerate launch` the launcher (torch elastic) forwards the signal it gets to the workers and SIGKILLs
    them 30 s later (`PContext.close(timeout=30)`, torch 2.8): a step that ends later than that is lost, and the run
    resumes from the previous checkpoint."""

    def __init__(self):
        self.signum: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        os.write(2, f"received {signal.Signals(signum).name}: saving a checkpoint after this step\n".encode())

    def on_train_begin(self, args, state, control, **kwargs):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handler)

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed_signal(args, self.signum or 0)
        if signum:
            self.signum = signum
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @staticmethod
    def _agreed_signal(args, signum: int) -> int:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return signum
        flag = torch.tensor([signum], dtype=torch.int64, device=args.device)  # NCCL needs the process's GPU
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or 0)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name
