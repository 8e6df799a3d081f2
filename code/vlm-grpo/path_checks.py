"""Checks of the folders a user passes (model, output), run before anything is loaded.

Without them a typo'd local model path reaches huggingface_hub, which reads it as a Hub id and ends a 40-line traceback
with `HFValidationError: Repo id must be in the form 'repo_name'...`, and an output dir that cannot be written fails
only when the first checkpoint is saved, after the training it was meant to keep. Each check raises PathError, whose
message names the path and what to pass instead; the scripts print it as one `error: ...` line.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

HUB_EXAMPLE = "Qwen/Qwen2.5-VL-3B-Instruct"


class PathError(ValueError):
    """A model or output path that cannot work: the message names it and says what to pass."""


def looks_like_local_path(name: str) -> bool:
    """True when `name` can only mean a folder on this machine, never a Hub id.

    A Hub id is `name` or `owner/name`: at most one `/`, no leading `.`, `/` or `~`, only letters, digits and `-_.`.
    So `outputs/smoke/tiny-qwen2.5-vl`, `./tiny` and `~/models/x` are paths; `outputs/tiny` is ambiguous (it could be
    a Hub id) and is left to the loader, whose failure grpo_vlm.py and the scripts also turn into one line."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in name:  # a Windows-style path
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def check_model_path(name: str | None, flag: str = "--model_name_or_path") -> None:
    """Refuse a model argument that names a local folder which does not exist, is a file, or holds no model."""
    if not name:
        raise PathError(f"{flag} is required: a model folder (holding config.json) or a Hub id like {HUB_EXAMPLE}")
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return
        if (path / "adapter_config.json").is_file():
            raise PathError(
                f"{flag} {name} is a LoRA adapter, not a model: pass its base model here (named in its "
                "adapter_config.json) and the adapter as --adapter, or merge it first (scripts/merge_lora.py)"
            )
        raise PathError(f"{flag} {name} holds no config.json, so it is no model folder: pass the folder that holds "
                        "config.json and the weights")
    if path.exists():
        raise PathError(f"{flag} {name} is a file: pass the model's folder (holding config.json) or a Hub id like "
                        f"{HUB_EXAMPLE}")
    if looks_like_local_path(name):
        raise PathError(f"{flag} {name}: no such folder ({path.absolute()} does not exist). Check the spelling (and "
                        f"the folder you run from), or pass a Hub id like {HUB_EXAMPLE}")


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message: loaders' messages run over several lines."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def model_load_error(name: str, err: BaseException, flag: str = "--model_name_or_path") -> PathError:
    """One line for a model that passed check_model_path but would not load (a Hub id not found, or not cached
    while offline)."""
    where = "not a folder here, and " if not Path(name).expanduser().exists() else ""
    reason = first_line(err).rstrip(".")
    return PathError(f"{flag} {name}: {where}it could not be loaded ({reason}). Check the spelling, the network (or "
                     "HF_HUB_OFFLINE with a cached model) and HF_TOKEN for gated models")


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def output_dir_problem(path: str) -> str | None:
    """Why `path` cannot become an output folder, or None if it can. Leaves nothing behind: it creates and removes
    a temporary folder in `path` or, when `path` does not exist yet, in its nearest existing parent (the folder the
    run will create it in). A real creation, because permission bits say "writable" to root on a read-only mount
    and on network file systems; a uniquely named one, because every process of a launch runs this check at once."""
    out = Path(path).expanduser().absolute()
    existing = _nearest_existing(out)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as err:
        return f"{existing} is not writable: {err.strerror or first_line(err)}"
    return None


def check_output_dir(path: str | None, flag: str = "--output_dir") -> None:
    """PathError when `path` cannot be created or written (see output_dir_problem); the folder is not created."""
    if not path:
        raise PathError(f"{flag} is required")
    problem = output_dir_problem(path)
    if problem:
        raise PathError(f"{flag} {path} cannot be written ({problem}): pass a folder you can write to, e.g. under "
                        "outputs/")
