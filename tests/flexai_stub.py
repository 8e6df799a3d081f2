"""Run the real Makefile targets with recording stand-ins for the `flexai`, `docker` and `nvidia-smi` CLIs.

Each stand-in is a small executable put first on PATH; every call writes its argv, one argument per line, to
`<calls>/<NNN>-<tool>.argv`. Nothing else about make is mocked: the tests read what the recipes really ran.
Shared by tests/test_makefile.py and tests/test_docs.py.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import _proc

REPO = Path(__file__).resolve().parents[1]

SECRET_PLACEHOLDER = "<HF_AUTH_TOKEN_SECRET_NAME>"
# the Makefile's SECRET default, which the docs use in place of the seed's placeholder
DEFAULT_SECRET = "hf-token"

# The seed recipe's `flexai training run` command, as argv after `flexai` (experiments/vlm-grpo/INTERNALS.md quotes the
# recipe's page; tests/test_makefile.py checks this list against that quote).
SEED_ARGV = [
    "training", "run", "vlm-grpo-training",
    "--repository-url", "https://github.com/flexaihq/blueprints",
    "--requirements-path", "code/vlm-grpo/requirements.txt",
    "--secret", f"HF_TOKEN={SECRET_PLACEHOLDER}",
    "--runtime", "pytorch-28-vllm-0110-nvidia",
    "--nodes", "1", "--accels", "2",
    "--", "accelerate", "launch",
    "--config_file=code/vlm-grpo/deepspeed_zero3.yaml",
    "code/vlm-grpo/grpo_vlm.py",
    "--model_name_or_path", "Qwen/Qwen2.5-VL-3B-Instruct",
    "--output_dir", "/output-checkpoint/grpo-Qwen2.5-VL-3B-Instruct",
    "--learning_rate", "1e-5",
    "--gradient_checkpointing",
    "--dtype", "bfloat16",
    "--max_prompt_length", "2048",
    "--max_completion_length", "1024",
    "--use_vllm",
    "--vllm_mode", "colocate",
    "--use_peft",
    "--lora_target_modules", "q_proj", "v_proj",
    "--log_completions",
    "--logging_steps", "200",
]

def offline_seed_script_args(model, output_dir, vllm: bool = False) -> list[str]:
    """The seed's grpo_vlm.py arguments with only the model, output dir and dataset (`synthetic`) swapped: the offline
    form of the user's command. `vllm=True` keeps `--use_vllm --vllm_mode colocate` (the CPU build of vLLM runs
    it); False drops them, for the tests of the transformers generation path."""
    args = SEED_ARGV[SEED_ARGV.index("code/vlm-grpo/grpo_vlm.py") + 1 :]
    args[args.index("--model_name_or_path") + 1] = str(model)
    args[args.index("--output_dir") + 1] = str(output_dir)
    if not vllm:
        args.remove("--use_vllm")
        i = args.index("--vllm_mode")
        del args[i : i + 2]
    return [*args, "--dataset_name", "synthetic"]


# The stand-in: record argv; `secret create` reads the value from stdin like the real CLI's prompt and records only
# its length; `inference inspect NAME -j` prints JSON with config.endpointUrl (STUB_ENDPOINT_URL), the field FlexAI's
# blueprints read; `docker info` prints the runtimes named in STUB_DOCKER_RUNTIMES; `nvidia-smi -L` lists one GPU.
STUB_SOURCE = '''#!{python}
import os, sys
from pathlib import Path
calls = Path(os.environ["STUB_CALLS"])
calls.mkdir(parents=True, exist_ok=True)
tool = Path(sys.argv[0]).name
n = len(list(calls.glob("*.argv")))
(calls / f"{{n:03d}}-{{tool}}.argv").write_text("".join(arg + "\\n" for arg in sys.argv[1:]))
if tool == "flexai" and sys.argv[1:3] == ["secret", "create"]:
    value = sys.stdin.readline().rstrip("\\n")
    (calls / f"{{n:03d}}-{{tool}}.stdin-length").write_text(str(len(value)))
    print("Secret created")
if tool == "flexai" and sys.argv[1:3] == ["inference", "inspect"] and "-j" in sys.argv:
    import json
    print(json.dumps({{"config": {{"endpointUrl": os.environ.get("STUB_ENDPOINT_URL", "https://endpoint.invalid")}}}}))
if tool == "docker" and sys.argv[1:2] == ["info"]:
    print(os.environ.get("STUB_DOCKER_RUNTIMES", '{{"runc":{{}}}}'))
if tool == "nvidia-smi":
    print("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-stub)")
'''


@dataclass
class MakeRun:
    returncode: int
    stdout: str
    stderr: str
    calls: list[tuple[str, list[str]]]  # (tool, argv without the program name), in call order
    calls_dir: Path

    def argv(self, tool: str = "flexai") -> list[list[str]]:
        return [args for name, args in self.calls if name == tool]


def make_stub_dir(tmp: Path, tools: tuple[str, ...] = ("flexai", "docker")) -> Path:
    bin_dir = tmp / "stub-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        path = bin_dir / tool
        path.write_text(STUB_SOURCE.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def clean_env(path: str, **extra: str) -> dict[str, str]:
    """A minimal environment: knobs such as NAME or MODEL in the caller's env (or MAKEFLAGS from `make test`)
    must not leak into the Makefile under test."""
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def run_make(
    tmp: Path,
    *args: str,
    tools: tuple[str, ...] = ("flexai", "docker"),
    stdin: str | None = None,
    env_extra: dict[str, str] | None = None,
    path_tail: str = "/usr/local/bin:/usr/bin:/bin",
) -> MakeRun:
    """Run `make ARGS...` in the repository with the stand-ins in `tools` first on PATH."""
    bin_dir = make_stub_dir(tmp, tools) if tools else None
    calls_dir = tmp / "calls"
    path = f"{bin_dir}:{path_tail}" if bin_dir else path_tail
    env = clean_env(path, STUB_CALLS=str(calls_dir), **(env_extra or {}))
    proc = _proc.run(
        ["make", "--no-print-directory", *args],
        cwd=REPO,
        env=env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=120,
    )
    calls = []
    if calls_dir.is_dir():
        for file in sorted(calls_dir.glob("*.argv")):
            tool = file.stem.split("-", 1)[1]
            calls.append((tool, file.read_text().splitlines()))
    return MakeRun(proc.returncode, proc.stdout, proc.stderr, calls, calls_dir)


# ---- shell command blocks in Markdown ----------------------------------------------------------------------

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def shell_blocks(markdown: str) -> list[str]:
    """Bodies of the ```bash / ```sh / ```shell blocks of a Markdown text, in order."""
    return [body for lang, body in FENCE.findall(markdown) if lang in ("bash", "sh", "shell")]


def block_commands(block: str) -> list[list[str]]:
    """The commands of one shell block as argv lists: continuations joined, comments and blank lines dropped."""
    return [argv for argv, _ in block_lines(block)]


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment) of one shell line: the comment starts at a `#` outside quotes that begins a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def block_lines(block: str) -> list[tuple[list[str], str]]:
    """(argv, trailing comment) of every command of one shell block: continuations joined, blank lines dropped.
    `export NAME=$(make ...)` gives the inner make command (what the line runs)."""
    joined = re.sub(r"\\\n", " ", block)
    lines = []
    for line in joined.splitlines():
        command, comment = split_comment(line)
        inner = re.fullmatch(r"export [A-Z_]+=\$\((make [^)]*)\)", command.strip())
        words = shlex.split(inner.group(1) if inner else command)
        if words:
            lines.append((words, comment))
    return lines


# ---- local inputs of the FlexAI targets that read a folder first ------------------------------------------------

def make_dataset_dir(folder: Path, drop: tuple[str, ...] = ()) -> Path:
    """A dataset folder in a shape the script loads (parquet of `image`, `problem`, `solution`), from the offline
    synthetic rows; `drop` removes columns (a folder without `solution` is bad input)."""
    from synthetic_data import make_synthetic_dataset

    folder.mkdir(parents=True, exist_ok=True)
    make_synthetic_dataset(4).remove_columns(list(drop)).to_parquet(str(folder / "train.parquet"))
    return folder


def make_ready_model_dir(folder: Path, drop: tuple[str, ...] = (), architectures: bool = True) -> Path:
    """The files an inference-ready model folder has (what scripts/merge_lora.py writes; weights empty: the make
    targets only check and upload files, tests/test_merge.py and tests/test_serve.py check a real merged model)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qwen2_5_vl", **({"architectures": ["Qwen2_5_VLForConditionalGeneration"]} if architectures else {})}
    files = {"config.json": json.dumps(config), "model.safetensors": "", "preprocessor_config.json": "{}",
             "tokenizer.json": "{}", "tokenizer_config.json": "{}", "chat_template.jinja": "{{ messages }}"}
    for name, text in files.items():
        if name not in drop:
            (folder / name).write_text(text)
    return folder


# target -> (knob naming its local folder, builder of a valid one)
LOCAL_INPUTS = {"flexai-dataset-push": ("DIR", make_dataset_dir), "flexai-checkpoint-push": ("MERGED", make_ready_model_dir)}


def makefile_default(knob: str) -> str:
    return re.search(rf"^{knob} \?= ?(.*)$", (REPO / "Makefile").read_text(), re.M).group(1)


def run_make_with_local_inputs(tmp: Path, *args: str, **kwargs) -> MakeRun:
    """run_make for commands as the docs write them: a target that checks a local folder before calling flexai
    (LOCAL_INPUTS) gets a valid folder built under tmp in place of the one the docs name, and the recorded flexai
    argv names the docs' folder again, so it compares with the docs' own `flexai` command."""
    targets = [a for a in args if "=" not in a and not a.startswith("-")]
    local = LOCAL_INPUTS.get(targets[0]) if targets else None
    if local is None:
        return run_make(tmp, *args, **kwargs)
    knob, build = local
    given = [a.split("=", 1)[1] for a in args if a.startswith(f"{knob}=")]
    shown = given[-1] if given else makefile_default(knob)
    folder = str(build(tmp / "local-input"))
    run = run_make(tmp, *[a for a in args if not a.startswith(f"{knob}=")], f"{knob}={folder}", **kwargs)
    run.calls = [(tool, [a.replace(folder, shown) for a in argv]) for tool, argv in run.calls]
    return run
