"""Every config file of the recipe is valid for the tool that reads it (torchtune's tests/recipes/test_configs.py):
the accelerate/DeepSpeed yaml, the requirements files, pyproject's pytest markers."""

from __future__ import annotations

import json
import re
import tomllib

import pytest
import yaml

ZERO3_YAML = "code/vlm-grpo/deepspeed_zero3.yaml"
REQUIREMENTS = ["code/vlm-grpo/requirements.txt", "code/vlm-grpo/requirements-dev.txt",
                "code/vlm-grpo/requirements-vllm-cpu.txt"]


# ---- code/vlm-grpo/deepspeed_zero3.yaml ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero3_config(repo_root):
    from accelerate.commands.config.config_args import load_config_from_file

    # accelerate's own loader: it rejects keys ClusterConfig does not know
    return load_config_from_file(str(repo_root / ZERO3_YAML))


def test_zero3_yaml_is_an_accelerate_deepspeed_zero3_config(zero3_config):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    assert isinstance(zero3_config, ClusterConfig)
    assert zero3_config.distributed_type == DistributedType.DEEPSPEED
    assert zero3_config.mixed_precision == "bf16"
    assert zero3_config.num_processes == 2  # the seed's --accels 2
    assert zero3_config.num_machines == 1
    assert zero3_config.use_cpu is False
    ds = zero3_config.deepspeed_config
    assert ds["zero_stage"] == 3
    assert ds["zero3_save_16bit_model"] is True  # else an empty LoRA adapter (U5)
    assert ds["zero3_init_flag"] is True


def test_zero3_yaml_deepspeed_keys_are_ones_accelerate_launch_reads(zero3_config):
    """accelerate does not check deepspeed_config's keys: a typo (`zero3_save_16bit_models`) would be ignored."""
    from accelerate.commands.launch import launch_command_parser

    launch_options = {action.dest for action in launch_command_parser()._actions}
    unknown = set(zero3_config.deepspeed_config) - launch_options
    assert not unknown, f"deepspeed_config keys accelerate launch does not know: {sorted(unknown)}"


def test_zero3_yaml_header_says_what_it_is_and_how_to_run_it(repo_root):
    text = (repo_root / ZERO3_YAML).read_text()
    header = text.split("\n\n")[0].splitlines()
    assert header[0].startswith("#")
    assert any(f"accelerate launch --config_file={ZERO3_YAML}" in line for line in header)
    # the Makefile reads num_processes with awk: it must stay on one `num_processes: N` line
    assert re.search(r"^num_processes: 2\b", text, re.M)


def _launch_env(config_path: str) -> dict[str, str]:
    """The ACCELERATE_* environment `accelerate launch --config_file CONFIG` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(
        ["--config_file", config_path, "--main_process_port", "0", "code/vlm-grpo/grpo_vlm.py"]
    )
    args, defaults, _ = _validate_launch_command(args)  # as accelerate 1.12's launch_command does
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.mark.parametrize("save_16bit, refused", [(True, False), (False, True)])
def test_launch_env_of_the_yaml_is_what_validate_args_reads(repo_root, tmp_path, monkeypatch, save_16bit, refused):
    """The yaml, through accelerate's launcher, sets the variables grpo_vlm.validate_args checks (U5)."""
    import grpo_vlm

    config = yaml.safe_load((repo_root / ZERO3_YAML).read_text())
    config["deepspeed_config"]["zero3_save_16bit_model"] = save_16bit
    path = tmp_path / "zero3.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(repo_root)
    env = _launch_env(str(path))
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == str(save_16bit).lower()

    args = grpo_vlm.parse_args(["--model_name_or_path", "tiny", "--output_dir", str(tmp_path), "--use_peft"])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if refused:
        with pytest.raises(grpo_vlm.ConfigError, match="zero3_save_16bit_model"):
            grpo_vlm.validate_args(*args)
    else:
        grpo_vlm.validate_args(*args)


# ---- code/vlm-grpo/deepspeed_zero3.json: the same ZeRO-3 settings for the torchrun route (NODES > 1) -------------

ZERO3_JSON = "code/vlm-grpo/deepspeed_zero3.json"


def _without_none(config):
    if isinstance(config, dict):
        return {k: _without_none(v) for k, v in config.items() if v is not None}
    return config


def test_zero3_json_is_a_deepspeed_zero3_config_that_saves_the_adapter(repo_root):
    config = json.loads((repo_root / ZERO3_JSON).read_text())
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # U5
    # mixed precision follows the trainer's --bf16 (TRL's default on GPUs), as the yaml's bf16 does under accelerate
    assert config["bf16"] == {"enabled": "auto"}


def test_zero3_json_and_yaml_give_the_trainer_the_same_deepspeed_config(repo_root, tmp_path, monkeypatch):
    """One set of ZeRO-3 settings, two routes: the DeepSpeed config the trainer ends up with from the yaml (through
    `accelerate launch`'s environment, as TrainingArguments reads it) equals the one from `--deepspeed` JSON (torchrun,
    FlexAI's multi-node launcher), key by key, after the Trainer fills the "auto" values from the same arguments."""
    import copy

    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    import grpo_vlm

    monkeypatch.chdir(repo_root)
    env = _launch_env(str(repo_root / ZERO3_YAML))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from_yaml = DeepSpeedPlugin()  # what TrainingArguments builds under accelerate launch
    from_yaml.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    for key in env:
        monkeypatch.delenv(key)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"

    script = ["--model_name_or_path", "tiny", "--output_dir", str(tmp_path), "--gradient_checkpointing"]
    args = grpo_vlm.parse_args([*script, "--deepspeed", ZERO3_JSON])[1]
    from_json = args.deepspeed_plugin
    for attr in ("zero_stage", "offload_optimizer_device", "offload_param_device", "zero3_init_flag",
                 "zero3_save_16bit_model"):
        assert getattr(from_json, attr) == getattr(from_yaml, attr), attr

    # the yaml's bf16 section comes from `mixed_precision: bf16`, the JSON's from "auto" + --bf16 (off on this CPU):
    # compared above and in the test before; everything else must be equal
    yaml_config = copy.deepcopy(from_yaml.deepspeed_config)
    yaml_config.pop("bf16")
    yaml_processed = HfTrainerDeepSpeedConfig(yaml_config)
    yaml_processed.trainer_config_process(args)  # what Trainer.propagate_args_to_deepspeed does on the yaml route
    json_config = {k: v for k, v in args.hf_deepspeed_config.config.items() if k != "bf16"}
    assert _without_none(yaml_processed.config) == _without_none(json_config)


@pytest.mark.parametrize("gather, refused", [(True, False), (False, True)])
def test_a_deepspeed_json_that_would_save_an_empty_adapter_is_refused(repo_root, tmp_path, gather, refused):
    """The torchrun route's U5 guard: the JSON's 16-bit gather on save, read the way the trainer reads it."""
    import grpo_vlm

    config = json.loads((repo_root / ZERO3_JSON).read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = gather
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(config))
    args = grpo_vlm.parse_args(["--model_name_or_path", "tiny", "--output_dir", str(tmp_path / "o"), "--use_peft",
                                "--deepspeed", str(path)])
    if refused:
        with pytest.raises(grpo_vlm.ConfigError, match=r"stage3_gather_16bit_weights_on_model_save.*trl#4416"):
            grpo_vlm.validate_args(*args)
    else:
        grpo_vlm.validate_args(*args)


# ---- requirements ------------------------------------------------------------------------------------------------

PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[A-Za-z0-9,._-]+\])?==(?P<version>[0-9][^\s#]*)\s+#\s*(?P<why>\S.*)$"
)


def _requirement_lines(path):
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and not line.startswith("-r "):
            yield raw


@pytest.mark.parametrize("req", REQUIREMENTS)
def test_every_pin_is_exact_with_a_why_comment(repo_root, req):
    lines = list(_requirement_lines(repo_root / req))
    assert lines, f"{req} pins nothing"
    bad = [line for line in lines if not PIN.match(line.strip())]
    assert not bad, f"{req}: lines that are not `name==version  # why`: {bad}"


def _pins(path) -> dict[str, str]:
    return {
        m["name"].lower().replace("_", "-"): m["version"]
        for m in (PIN.match(line.strip()) for line in _requirement_lines(path))
        if m
    }


def test_runtime_pins_cover_the_stack_known_issues_was_measured_on(repo_root):
    pins = _pins(repo_root / REQUIREMENTS[0])
    expected = {"trl": "1.2.0", "transformers": "4.57.6", "peft": "0.18.1", "accelerate": "1.12.0",
                "deepspeed": "0.18.9", "datasets": "4.8.5"}
    assert {k: pins.get(k) for k in expected} == expected
    assert "torch" not in pins and "vllm" not in pins  # the FlexAI runtime provides them


def test_dev_requirements_add_the_runtime_torch_and_no_vllm(repo_root):
    text = (repo_root / REQUIREMENTS[1]).read_text()
    assert re.search(r"^-r requirements\.txt\s*$", text, re.M)
    pins = _pins(repo_root / REQUIREMENTS[1])
    assert pins.get("torch") == "2.8.0"
    assert pins.get("torchvision") == "0.23.0"
    assert "vllm" not in pins
    assert not re.search(r"^\s*vllm", text, re.M | re.I)


@pytest.mark.parametrize("req", REQUIREMENTS)
def test_installed_versions_match_the_pins(repo_root, req):
    """The venv the tests run in is the pinned one (else every result here is about another stack)."""
    from importlib.metadata import PackageNotFoundError, version

    mismatched = {}
    for name, pinned in _pins(repo_root / req).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # e.g. the runtime-only packages on a dev box
        if installed.split("+")[0] != pinned:
            mismatched[name] = (pinned, installed)
    assert not mismatched, f"pinned vs installed: {mismatched}"


# ---- pyproject.toml ---------------------------------------------------------------------------------------------


def test_pyproject_declares_slow_and_gpu_markers(repo_root):
    config = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    declared = {m.split(":")[0].strip() for m in config["markers"]}
    assert {"slow", "gpu"} <= declared
    assert "not gpu" in config.get("addopts", "")
    assert config["testpaths"] == ["tests"]
