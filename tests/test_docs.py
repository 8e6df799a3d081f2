"""experiments/vlm-grpo/README.md cannot drift from the Makefile.

Every shell block command of the guide is a `flexai` or a `make` command. The `make` commands are run for real
(FlexAI and Docker targets against the recording stand-ins of tests/flexai_stub.py; targets that would train or
install are only resolved with `make -n`), and every `flexai` command of the guide must be exactly one of the
calls those `make` commands made. The training command must be the seed's.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from flexai_stub import DEFAULT_SECRET, REPO, SECRET_PLACEHOLDER, SEED_ARGV, block_commands, clean_env, run_make, shell_blocks

GUIDE = REPO / "experiments" / "vlm-grpo" / "README.md"
KNOWN_ISSUES = REPO.parent / "shared" / "KNOWN_ISSUES.md"
MAKEFILE = REPO / "Makefile"

# run with the stand-ins: they only call the flexai/docker CLIs (or print)
EXECUTED = re.compile(r"^(flexai-.*|docker-build|local-smoke|help|info)$")
# resolved with `make -n` only: they install, train or need scripts other issues provide
DRY_RUN = {"venv", "smoke", "test", "merge", "eval", "plot", "infer", "learning-demo"}


def guide_commands() -> list[list[str]]:
    return [c for block in shell_blocks(GUIDE.read_text()) for c in block_commands(block)]


def make_commands() -> list[list[str]]:
    return [c for c in guide_commands() if c[0] == "make"]


def split_make(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    targets = [a for a in argv[1:] if "=" not in a]
    knobs = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    return targets, knobs


def documented_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):.*## ", MAKEFILE.read_text(), re.M))


def knob_names() -> set[str]:
    return set(re.findall(r"^([A-Z_]+) \?=", MAKEFILE.read_text(), re.M))


def test_guide_has_commands():
    assert len(make_commands()) >= 10
    assert sum(c[0] == "flexai" for c in guide_commands()) >= 8


def test_every_command_is_flexai_or_make():
    assert [c for c in guide_commands() if c[0] not in ("flexai", "make")] == []


def test_make_commands_use_documented_targets_and_knobs():
    for argv in make_commands():
        targets, knobs = split_make(argv)
        assert len(targets) == 1, argv
        assert targets[0] in documented_targets(), argv
        assert set(knobs) <= knob_names(), argv
        assert EXECUTED.match(targets[0]) or targets[0] in DRY_RUN, f"{argv}: classify it in test_docs.py"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> list[tuple[list[str], list[list[str]]]]:
    """Run every executable `make` command of the guide: (its argv, the flexai argv lists it produced)."""
    results = []
    for i, argv in enumerate(make_commands()):
        targets, _ = split_make(argv)
        if not EXECUTED.match(targets[0]):
            continue
        tmp = tmp_path_factory.mktemp(f"cmd{i}")
        extra = [f"LOCAL_SMOKE_DIR={tmp}/smoke-out"] if targets[0] == "local-smoke" else []
        run = run_make(tmp, *argv[1:], *extra, stdin="hf_placeholder_value\n")
        assert run.returncode == 0, f"{argv}: {run.stderr}"
        if targets[0].startswith("flexai-"):
            assert len(run.argv("flexai")) == 1, argv
        results.append((argv, run.argv("flexai")))
    return results


def test_every_flexai_command_of_the_guide_is_what_make_runs(recorded):
    calls = [call for _, made in recorded for call in made]
    for argv in guide_commands():
        if argv[0] == "flexai":
            assert argv[1:] in calls, f"no make command of the guide runs: {' '.join(argv)}"


def test_every_plain_flexai_target_of_the_guide_shows_its_flexai_command(recorded):
    # `make flexai-X` with default knobs (CKPT aside) stands next to the flexai command it runs
    shown = [c[1:] for c in guide_commands() if c[0] == "flexai"]
    for argv, made in recorded:
        if set(split_make(argv)[1]) <= {"CKPT"}:
            assert [c for c in made if c not in shown] == [], argv


def test_guide_training_command_is_the_seed_command():
    runs = [c[1:] for c in guide_commands() if c[:3] == ["flexai", "training", "run"]]
    seed = [a.replace(SECRET_PLACEHOLDER, DEFAULT_SECRET) for a in SEED_ARGV]
    assert runs[0] == seed


def test_dry_run_targets_resolve(tmp_path):
    for argv in make_commands():
        targets, _ = split_make(argv)
        if targets[0] in DRY_RUN:
            proc = subprocess.run(
                ["make", "--no-print-directory", "-n", *argv[1:]], cwd=REPO, capture_output=True, text=True,
                env=clean_env("/usr/local/bin:/usr/bin:/bin"), timeout=60,
            )
            assert proc.returncode == 0, f"{argv}: {proc.stderr}"


def test_every_seed_script_argument_is_explained():
    launch = SEED_ARGV[SEED_ARGV.index("code/vlm-grpo/grpo_vlm.py") + 1 :]
    table = GUIDE.read_text().split("## Key arguments", 1)[1].split("\n## ", 1)[0]
    for flag in (a for a in launch if a.startswith("--")):
        assert f"| `{flag}` |" in table, f"{flag} missing from the Key arguments table"


@pytest.mark.parametrize("doc", [GUIDE, REPO / "README.md", REPO / "experiments" / "vlm-grpo" / "BENCHMARKS.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    links = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", doc.read_text())
    missing = {link for link in links if not (doc.parent / link).exists()}
    assert not missing, f"{doc.name} links to files that do not exist: {sorted(missing)}"


def test_internal_anchors_resolve():
    text = GUIDE.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, anchor
    # the Makefile's multi-node error points here
    assert "multi-node" in anchors and "experiments/vlm-grpo/README.md#multi-node" in MAKEFILE.read_text()


def test_benchmark_numbers_in_docs_match_the_raw_results():
    """The seed/tuned numbers quoted by the guide, README and BENCHMARKS.md are the ones in the committed bench.json
    of the run they cite (experiments/vlm-grpo/bench-results/), so a re-run cannot leave stale numbers behind."""
    raw = json.loads((REPO / "experiments/vlm-grpo/bench-results/3-batched-vision-zero3-knobs.json").read_text())
    results = {r["name"]: r for r in raw["results"]}
    seed, tuned = results["seed"], results["tuned"]
    assert raw["generation"] == "transformers" and raw["completion_length"] == 1024
    ratio = f"{tuned['samples_per_s'] / seed['samples_per_s']:.2f}×"
    quoted = {
        "ratio": ratio,
        "seed s/step": f"{seed['step_s']:.1f}",
        "tuned s/step": f"{tuned['step_s']:.1f}",
        "seed samples/s": f"{seed['samples_per_s']:.2f}",
        "tuned samples/s": f"{tuned['samples_per_s']:.2f}",
        "seed MFU": f"{100 * seed['mfu']:.1f} %",
        "tuned MFU": f"{100 * tuned['mfu']:.1f} %",
        "seed peak": f"{max(seed['nvidia_smi_peak_mib'].values()) / 1024:.1f} GiB",
        "tuned peak": f"{max(tuned['nvidia_smi_peak_mib'].values()) / 1024:.1f} GiB",
    }
    for doc in (GUIDE, REPO / "experiments/vlm-grpo/BENCHMARKS.md"):
        text = doc.read_text()
        missing = {k: v for k, v in quoted.items() if v not in text}
        assert not missing, f"{doc.name} does not quote {missing}"
    readme = (REPO / "README.md").read_text()
    assert ratio in readme and quoted["tuned MFU"] in readme
    # The tuned flags the guide recommends are the ones that were measured.
    tuned_flags = " ".join(tuned["script_args"])
    recommended = re.search(r'make flexai-train ARGS="(--per_device_train_batch_size[^"]+)"', GUIDE.read_text()).group(1)
    assert recommended in tuned_flags


@pytest.mark.skipif(not KNOWN_ISSUES.is_file(), reason="shared/KNOWN_ISSUES.md is not beside this checkout")
def test_troubleshooting_covers_every_known_issue():
    ids = set(re.findall(r"^\| ([MU]\d+) \|", KNOWN_ISSUES.read_text(), re.M))
    assert ids, "KNOWN_ISSUES.md format changed"
    troubleshooting = GUIDE.read_text().split("## Troubleshooting", 1)[1]
    for issue in sorted(ids):
        assert f"[{issue}]" in troubleshooting, f"{issue} is not in the Troubleshooting table"


def test_data_preparation_numbers_in_docs_match_the_raw_results():
    """The data-preparation numbers the guide and README quote are those of the committed measurement files."""
    results = REPO / "experiments/vlm-grpo/data-prep-results"
    cold = json.loads((results / "scale-7700-2proc-cold.json").read_text())
    cached = json.loads((results / "scale-7700-2proc-cached.json").read_text())
    survey = json.loads((results / "scale-7700-dry-run.json").read_text())
    prep, wait = cold["processes"]
    data = survey["plan"]["data"]
    assert cold["rows"] == 7700 and cold["kept_fraction"] >= 0.99  # the issue's bar: >= 99 % of rows kept
    assert len(cold["processes"]) == 2 and prep["cache_files"] == wait["cache_files"]
    downscaled = int(re.search(r"(\d+) downscaled", cold["summary"]).group(1))
    guide = {
        "kept": f"{cold['kept']:,} of {cold['rows']:,}, {downscaled:,} downscaled",
        "process 0": f"{prep['preparation_wall_s']} s ({prep['preparation_cpu_s']} s of CPU), "
                     f"peak RSS {prep['peak_rss_mib']:,} MiB",
        "process 1": f"{wait['preparation_wall_s']} s waiting ({wait['preparation_cpu_s']} s of CPU), "
                     f"peak RSS {wait['peak_rss_mib']:,} MiB",
        "cached 0": f"{cached['processes'][0]['preparation_wall_s']} s, peak RSS {cached['processes'][0]['peak_rss_mib']:,} MiB",
        "cached 1": f"{cached['processes'][1]['preparation_wall_s']} s, peak RSS {cached['processes'][1]['peak_rss_mib']:,} MiB",
        "anonymous": f"anonymous memory (sampled every 0.1 s) peaked at {prep['peak_rss_anon_mib_sampled']:,} MiB",
        "drop keeps": f"keeps {data['kept']['drop']:,} of the {data['rows']:,}",
        "dry run time": f"took {survey['wall_s']} s",
        "sides": f"longer side median {data['image_longer_side']['p50']} px ({data['over_max_image_side']:,} rows over 512)",
        "tokens": f"median {data['image_tokens']['original']['p50']} and at most {data['image_tokens']['original']['max']:,} "
                  f"as stored, median {data['image_tokens']['downscale']['p50']} and at most "
                  f"{data['image_tokens']['downscale']['max']} downscaled",
        "policies": f"rows kept {data['kept']['downscale']:,} (`downscale`) vs {data['kept']['drop']:,} (`drop`)",
    }
    text = " ".join(GUIDE.read_text().split())  # line breaks of the Markdown source do not matter
    missing = {k: v for k, v in guide.items() if v not in text}
    assert not missing, f"the guide does not quote {missing}"
    readme = " ".join((REPO / "README.md").read_text().split())
    for quoted in (f"{prep['preparation_wall_s']} s once per node", f"{prep['peak_rss_mib']:,} MiB peak RSS",
                   f"{wait['peak_rss_mib']:,} MiB in the other", f"{downscaled:,} downscaled"):
        assert quoted in readme, quoted
