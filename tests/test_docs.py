"""The user's docs (README.md, experiments/vlm-grpo/README.md: the guide) cannot drift from the Makefile, and every
reference, id and number in the repository's docs resolves inside the repository.

Every shell block of the guide is one step of one path: its commands are `make` targets (plus the two lines that put
the endpoint's key and URL in the environment). The `make` commands are run for real (FlexAI and Docker targets
against the recording stand-ins of tests/flexai_stub.py; targets that would train or install are only resolved with
`make -n`), and a `# flexai ...` comment beside one must be the call it made. The guards of issue 21: no block shows
two forms of one step, no FlexAI resource is created twice along README + guide, every `<placeholder>` names the
earlier command that printed it, a short run never sets --max_steps without --logging_steps, README's first screen
keeps its at-a-glance block, and no doc cites a file or a ledger id that the repository does not hold.

Every measured number of README.md, the guide, BENCHMARKS.md and INTERNALS.md is in QUOTES: recomputed from the raw
result file it comes from (experiments/vlm-grpo/{bench,cpu,data-prep}-results/), quoted exactly, with a link to that
file nearby; numbers that had no raw file (or were superseded) were removed and are listed in REMOVED.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shlex

import pytest

import _proc  # every test process: time-bounded, whole tree killed (tests/_proc.py)
from flexai_stub import (
    DEFAULT_SECRET,
    REPO,
    SEED_ARGV,
    block_lines,
    clean_env,
    run_make_with_local_inputs,
    shell_blocks,
)

GUIDE = REPO / "experiments" / "vlm-grpo" / "README.md"
INTERNALS = REPO / "experiments" / "vlm-grpo" / "INTERNALS.md"
MAKEFILE = REPO / "Makefile"
README_PATH = REPO / "README.md"

# run with the stand-ins: they only call the flexai/docker CLIs (or print)
EXECUTED = re.compile(r"^(flexai-.*|docker-build|local-smoke|help|info)$")
# resolved with `make -n` only: they install, train or need scripts other issues provide
DRY_RUN = {"venv", "smoke", "test", "dry-run", "merge", "eval", "plot", "infer", "learning-demo"}
# the shell lines of the serving step that are not make commands: the key is read at a prompt, never typed in a line
SHELL_LINES = {("read", "-rs", "FLEXAI_API_KEY", "&&", "export", "FLEXAI_API_KEY")}


def doc_lines(doc: pathlib.Path) -> list[tuple[int, list[str], str]]:
    """(block index, argv, trailing comment) of every command line of the doc's shell blocks, in order."""
    return [(i, argv, comment) for i, block in enumerate(shell_blocks(doc.read_text()))
            for argv, comment in block_lines(block)]


def guide_commands() -> list[list[str]]:
    return [argv for _, argv, _ in doc_lines(GUIDE) if tuple(argv) not in SHELL_LINES]


def make_commands() -> list[list[str]]:
    return [c for c in guide_commands() if c[0] == "make"]


def split_make(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    targets = [a for a in argv[1:] if "=" not in a and not a.startswith("-")]
    knobs = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    return targets, knobs


def documented_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):.*## ", MAKEFILE.read_text(), re.M))


def knob_names() -> set[str]:
    return set(re.findall(r"^([A-Z_]+) \?=", MAKEFILE.read_text(), re.M))


def flexai_comments() -> list[tuple[list[str], list[str]]]:
    """(make argv, the `flexai ...` comment beside it as argv after `flexai`) of the guide."""
    return [(argv, shlex.split(comment)[1:]) for _, argv, comment in doc_lines(GUIDE)
            if argv[0] == "make" and comment.startswith("flexai ")]


def test_guide_has_commands():
    assert len(make_commands()) >= 15
    assert len(flexai_comments()) >= 10


def test_every_command_is_make_or_a_known_shell_line():
    others = [argv for _, argv, _ in doc_lines(GUIDE) if argv[0] != "make" and tuple(argv) not in SHELL_LINES]
    assert others == []
    # `export X=$(make ...)` is read as its make command; any other export would be a value typed in by hand
    assert not re.search(r"^export [A-Z_]+=(?!\$\(make )", GUIDE.read_text(), re.M)


def test_make_commands_use_documented_targets_and_knobs():
    for argv in make_commands():
        targets, knobs = split_make(argv)
        assert len(targets) == 1, argv
        assert targets[0] in documented_targets(), argv
        assert set(knobs) <= knob_names(), argv
        assert EXECUTED.match(targets[0]) or targets[0] in DRY_RUN, f"{argv}: classify it in test_docs.py"


def record(tmp: pathlib.Path, argv: list[str]):
    """Run one doc `make flexai-*`/Docker command against the stand-ins: its flexai calls (argv after `flexai`)."""
    targets, _ = split_make(argv)
    extra = [f"LOCAL_SMOKE_DIR={tmp}/smoke-out"] if targets[0] == "local-smoke" else []
    run = run_make_with_local_inputs(tmp, *argv[1:], *extra, stdin="hf_placeholder_value\n")
    assert run.returncode == 0, f"{argv}: {run.stderr}"
    return run


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> list[tuple[list[str], list[list[str]]]]:
    """Run every executable `make` command of the guide: (its argv, the flexai argv lists it produced)."""
    results = []
    for i, argv in enumerate(make_commands()):
        if not EXECUTED.match(split_make(argv)[0][0]):
            continue
        run = record(tmp_path_factory.mktemp(f"cmd{i}"), argv)
        if split_make(argv)[0][0].startswith("flexai-"):
            assert len(run.argv("flexai")) == 1, argv
        results.append((argv, run.argv("flexai")))
    return results


def comment_matches(call: list[str], comment: list[str]) -> bool:
    """A `# flexai ...` comment is the call, or its start followed by `...`."""
    if "..." in comment:
        head = comment[: comment.index("...")]
        return call[: len(head)] == head
    return call == comment


def test_every_flexai_comment_is_what_make_runs(recorded):
    made = {tuple(argv): calls for argv, calls in recorded}
    for argv, comment in flexai_comments():
        (call,) = made[tuple(argv)]
        assert comment_matches(call, comment), f"{' '.join(argv)}: runs {call}, the comment says {comment}"


def test_comment_check_catches_a_wrong_comment():  # control of the test above
    call = ["training", "logs", "vlm-grpo-training"]
    assert comment_matches(call, ["training", "logs", "vlm-grpo-training"])
    assert not comment_matches(call, ["training", "logs", "other-job"])
    assert comment_matches(["training", "run", "x", "--a"], ["training", "run", "x", "..."])
    assert not comment_matches(["training", "run", "y", "--a"], ["training", "run", "x", "..."])


def seed_text_block(doc: pathlib.Path) -> list[str]:
    """The ```text block of doc that starts with `flexai training run`, as argv after `flexai`."""
    (block,) = [b for b in re.findall(r"^```text\n(.*?)^```", doc.read_text(), re.S | re.M)
                if b.startswith("flexai training run")]
    return shlex.split(block.replace("\\\n", " "))[1:]


def test_guide_shows_the_seed_command_that_make_flexai_train_runs(recorded):
    seed = [a.replace("<HF_AUTH_TOKEN_SECRET_NAME>", DEFAULT_SECRET) for a in SEED_ARGV]
    assert seed_text_block(GUIDE) == seed
    (train_calls,) = [calls for argv, calls in recorded if argv == ["make", "flexai-train"]]
    assert train_calls == [seed]


def test_dry_run_targets_resolve(tmp_path):
    for argv in make_commands():
        targets, _ = split_make(argv)
        if targets[0] in DRY_RUN:
            proc = _proc.run(
                ["make", "--no-print-directory", "-n", *argv[1:]], cwd=REPO, capture_output=True, text=True,
                env=clean_env("/usr/local/bin:/usr/bin:/bin"), timeout=60,
            )
            assert proc.returncode == 0, f"{argv}: {proc.stderr}"


def test_every_seed_script_argument_is_explained():
    launch = SEED_ARGV[SEED_ARGV.index("code/vlm-grpo/grpo_vlm.py") + 1 :]
    table = GUIDE.read_text().split("## Key arguments", 1)[1].split("\n## ", 1)[0]
    for flag in (a for a in launch if a.startswith("--")):
        assert f"| `{flag}` |" in table, f"{flag} missing from the Key arguments table"


# ---- issue 21's guards: one path, each step once, nothing that does not resolve ------------------------------------

# FlexAI calls that create something (a job, a secret, a dataset, a checkpoint, an endpoint) or connect the account:
# a reader pasting README then guide in order must meet each of them at most once.
CREATES = {("code-registry", "connect"), ("secret", "create"), ("training", "run"), ("dataset", "push"),
           ("checkpoint", "push"), ("inference", "serve")}


def flexai_action(call: list[str]) -> tuple[str, ...]:
    """What a flexai call does to what: subcommand and the first positional (the job, secret, endpoint... name)."""
    words = call[:2]
    rest = [a for a in call[2:] if not a.startswith("-")]
    return tuple(words + rest[:1])


def duplicate_steps(blocks: list[list[tuple[list[str], list[list[str]]]]]) -> list[str]:
    """Problems in a sequence of blocks, each a list of (command argv, the flexai calls it makes): two forms of one
    step in a block (two commands making the same FlexAI call, e.g. `make flexai-secret` and `flexai secret create`),
    or a FlexAI resource created twice along the whole sequence."""
    problems, created = [], {}
    for n, block in enumerate(blocks):
        seen = {}
        for argv, calls in block:
            for call in calls:
                action = flexai_action(call)
                if action in seen:
                    problems.append(f"block {n}: {' '.join(seen[action])!r} and {' '.join(argv)!r} are one step")
                seen[action] = argv
                if tuple(call[:2]) in CREATES:
                    if action in created:
                        problems.append(f"block {n}: {' '.join(argv)!r} repeats {created[action]!r}")
                    created[action] = " ".join(argv)
    return problems


@pytest.fixture(scope="module")
def path_blocks(tmp_path_factory) -> list[list[tuple[list[str], list[list[str]]]]]:
    """README's then the guide's shell blocks, each command with the flexai calls it makes (a literal `flexai`
    command is its own call; `make` FlexAI targets run against the stand-ins)."""
    out = []
    for doc in (README_PATH, GUIDE):
        for i, block in enumerate(shell_blocks(doc.read_text())):
            entries = []
            for j, (argv, _) in enumerate(block_lines(block)):
                if argv[0] == "flexai":
                    entries.append((argv, [argv[1:]]))
                elif argv[0] == "make" and split_make(argv)[0][0].startswith("flexai-"):
                    run = record(tmp_path_factory.mktemp(f"{doc.parent.name}-{i}-{j}"), argv)
                    entries.append((argv, run.argv("flexai")))
            out.append(entries)
    return out


def test_no_step_twice_along_readme_and_guide(path_blocks):
    assert duplicate_steps(path_blocks) == []
    assert sum(len(b) for b in path_blocks) >= 15  # the path's FlexAI steps were all read


def test_the_duplicate_check_catches_both_forms_and_repeats():  # controls, with the guide's old shapes
    secret = [(["make", "flexai-secret"], [["secret", "create", "hf-token"]]),
              (["flexai", "secret", "create", "hf-token"], [["secret", "create", "hf-token"]])]
    assert len(duplicate_steps([secret])) == 2  # one step twice in a block, and created twice
    train = (["make", "flexai-train"], [["training", "run", "vlm-grpo-training", "--nodes", "1"]])
    assert duplicate_steps([[train], [train]]) == ["block 1: 'make flexai-train' repeats 'make flexai-train'"]
    other = (["make", "flexai-train", "NAME=x"], [["training", "run", "x", "--nodes", "1"]])
    assert duplicate_steps([[train], [other]]) == []


PLACEHOLDER = re.compile(r"<[a-z][a-z0-9-]*>")


def unexplained_placeholders(lines: list[tuple[list[str], str]]) -> list[str]:
    """Placeholders of command lines (in reading order) whose trailing comment does not name an earlier command
    that produced them (`make X` or `flexai X` seen as a command before)."""
    problems, seen = [], []
    for argv, comment in lines:
        for placeholder in sorted(set(PLACEHOLDER.findall(" ".join(argv)))):
            if not comment.startswith(f"{placeholder}:"):
                problems.append(f"{' '.join(argv)}: {placeholder} is not explained in its comment")
            elif not any(cmd in comment for cmd in seen):
                problems.append(f"{' '.join(argv)}: the command that printed {placeholder} comes later or nowhere")
        seen.append(" ".join(argv[:2]) if argv[0] == "make" else " ".join(argv[:3]))
    return problems


def test_every_placeholder_names_the_earlier_command_that_printed_it():
    lines = [(argv, comment) for doc in (README_PATH, GUIDE) for _, argv, comment in doc_lines(doc)]
    assert unexplained_placeholders(lines) == []
    assert any(PLACEHOLDER.search(" ".join(argv)) for argv, _ in lines)  # the check had something to check


def test_the_placeholder_check_catches_an_unexplained_or_early_one():  # control
    fetch = ["make", "flexai-fetch", "CKPT=<checkpoint-id>"]
    listing = (["make", "flexai-checkpoints"], "")
    assert unexplained_placeholders([listing, (fetch, "<checkpoint-id>: an ID make flexai-checkpoints listed")]) == []
    assert unexplained_placeholders([(fetch, "")])  # no explanation
    assert unexplained_placeholders([(fetch, "<checkpoint-id>: an ID make flexai-checkpoints listed"), listing])


def short_runs_without_logging(text: str) -> list[str]:
    """Examples (shell lines, inline code spans, ARGS="..." values) that set --max_steps N without --logging_steps:
    with the seed's --logging_steps 200 such a run logs nothing."""
    spans = re.findall(r"`([^`\n]+)`", text) + [line for line in text.splitlines() if not line.startswith("|")]
    spans += re.findall(r'ARGS="([^"]*)"', text)
    return sorted({s for s in spans if re.search(r"--max_steps[ =]\d", s) and "--logging_steps" not in s})


@pytest.mark.parametrize("doc", [README_PATH, GUIDE, INTERNALS, REPO / "experiments" / "vlm-grpo" / "BENCHMARKS.md",
                                 MAKEFILE], ids=lambda p: str(p.relative_to(REPO)))
def test_short_run_examples_log(doc):
    text = doc.read_text()
    if doc == MAKEFILE:  # the help texts users read
        text = "\n".join(line for line in text.splitlines() if line.startswith("##"))
    assert short_runs_without_logging(text) == []


def test_the_short_run_check_catches_a_run_that_logs_nothing():  # control: the guide's old example
    assert short_runs_without_logging('make flexai-train NAME=vlm-grpo-short ARGS="--max_steps 100 --save_steps 50"')
    assert not short_runs_without_logging('`ARGS="--max_steps 100 --save_steps 50 --logging_steps 5"`')


GLANCE_ROWS = ("hardware", "GPU memory", "a default run", "measured", "not measured", "evidence of learning")


def glance_problems(readme: str) -> list[str]:
    """What README's first screen (45 lines) lacks of the at-a-glance block."""
    screen = readme.splitlines()[:45]
    if "## At a glance" not in screen:
        return ["no `## At a glance` heading in the first 45 lines"]
    block = screen[screen.index("## At a glance"):]
    return [f"row {row!r} missing" for row in GLANCE_ROWS if not any(line.startswith(f"| {row} |") for line in block)]


def test_readme_first_screen_keeps_the_at_a_glance_block():
    assert glance_problems(README_PATH.read_text()) == []


def test_the_first_screen_check_catches_a_block_pushed_down():  # control
    readme = README_PATH.read_text()
    pushed = readme.replace("## At a glance", "\n" * 40 + "## At a glance", 1)
    assert glance_problems(pushed) == ["no `## At a glance` heading in the first 45 lines"]
    assert glance_problems(readme.replace("| not measured |", "| unmeasured |")) == ["row 'not measured' missing"]


DOCS = [README_PATH, GUIDE, INTERNALS, REPO / "experiments" / "vlm-grpo" / "BENCHMARKS.md",
        REPO / "experiments" / "vlm-grpo" / "cpu-results" / "README.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    links = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", doc.read_text())
    missing = {link for link in links if not (doc.parent / link).exists()}
    assert not missing, f"{doc.name} links to files that do not exist: {sorted(missing)}"


def anchors(doc: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)  # `# comments` in blocks are no headings
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_anchors_resolve(doc):
    """Links to `#anchor` in the doc itself and to `other.md#anchor` land on a heading."""
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", doc.read_text()):
        if target.startswith("http"):
            continue
        path = (doc.parent / target) if target else doc
        assert anchor in anchors(path), f"{doc.name}: {target}#{anchor}"
    # the Makefile's multi-node knob points here
    assert "multi-node" in anchors(GUIDE) and "experiments/vlm-grpo/README.md#multi-node" in MAKEFILE.read_text()


def tracked_text_files() -> list[pathlib.Path]:
    files = _proc.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout.split()
    raw = re.compile(r"-results/|\.(png|jpg|json|log|txt)$")  # raw results are records, quoted as they were made
    return [REPO / f for f in files if not raw.search(f) or f.endswith("requirements.txt") or
            re.search(r"requirements-[a-z-]+\.txt$", f)]


LEDGER_IDS = re.compile(r"^\| (M\d+'?|U\d+) \|", re.M)
CITED_IDS = re.compile(r"\b([MU]\d{1,2})('(?!s))?")


def test_every_cited_id_resolves_in_the_ledger():
    """M1…M11 (and M1'), U1…U9, wherever cited (code comments, tests, docs, the Makefile), have their row in the
    fix ledger of INTERNALS.md, each with its cause and fix; there is no other ledger to point at."""
    ledger = set(LEDGER_IDS.findall(INTERNALS.read_text()))
    assert {f"M{i}" for i in range(1, 12)} | {f"U{i}" for i in range(1, 10)} | {"M1'"} <= ledger
    cited = {}
    for path in tracked_text_files():
        for match in CITED_IDS.finditer(path.read_text(errors="ignore")):
            cited.setdefault(match.group(1) + (match.group(2) or ""), path.relative_to(REPO))
    assert len(cited) >= 15
    missing = {i: str(p) for i, p in cited.items() if i not in ledger}
    assert not missing, f"ids cited without a ledger row: {missing}"


def test_the_guide_troubleshooting_links_the_ledger():
    troubleshooting = GUIDE.read_text().split("## Troubleshooting", 1)[1]
    assert "INTERNALS.md#known-issues-the-fix-ledger" in troubleshooting
    assert {"U1", "M1", "M2", "M4", "M8", "U2", "U4", "U8", "M10"} <= set(re.findall(r"\[([MU]\d+)\]", troubleshooting))


# References that point outside the repository: the team's notes beside the checkout, or the machines measurements
# ran on named other than by their hardware.
OUTSIDE = re.compile(r"\.\./shared|shared/(seed|KNOWN_ISSUES|vllm-cpu|device|STYLE)|KNOWN_ISSUES|team's shared|KINDS\.md|"
                     r"device machine|device kind|device budget|device time|device's wheels")


def outside_references(text: str) -> list[str]:
    return sorted({m.group(0) for m in OUTSIDE.finditer(text)})


def test_nothing_refers_outside_the_repository():
    found = {str(p.relative_to(REPO)): outside_references(p.read_text(errors="ignore")) for p in tracked_text_files()}
    found = {f: refs for f, refs in found.items() if refs and f != "tests/test_docs.py"}
    assert found == {}, "cite what is inside the repository (the fix ledger: experiments/vlm-grpo/INTERNALS.md)"


def test_the_outside_reference_check_catches_the_old_forms():  # control: what the docs and tests said before
    assert outside_references("see KNOWN_ISSUES.md M4") == ["KNOWN_ISSUES"]
    assert outside_references("(KNOWN_ISSUES M8 / trl#6294)") == ["KNOWN_ISSUES"]  # an id without the file name
    assert outside_references("NVLink multicast stays off (KINDS.md)") == ["KINDS.md"]
    assert outside_references('REPO' + '.parent / "shared" / "seed"') == []  # joined paths: the next test
    assert outside_references("(../shared/device/README.md)") == ["../shared"]
    assert outside_references("vLLM is not installed on the project's device machine") == ["device machine"]


def test_no_test_reads_files_beside_the_checkout():
    needles = ("REPO" + ".parent", "repo_root" + ".parent")  # spelled apart so this file does not match itself
    for path in sorted((REPO / "tests").glob("*.py")):
        assert not any(n in path.read_text() for n in needles), path.name


PATHS_IN_DOCS = re.compile(r"`((?:code|scripts|tests|experiments|docker)/[A-Za-z0-9_./-]+)`")


@pytest.mark.parametrize("doc", DOCS + [MAKEFILE], ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_a_doc_names_exists(doc):
    """`code/...`, `scripts/...`, `tests/...` paths named in backticks exist (a file, or a folder)."""
    named = {m.rstrip(".") for m in PATHS_IN_DOCS.findall(doc.read_text())}
    missing = sorted(n for n in named if not (REPO / n.split("::")[0]).exists() and "*" not in n)
    assert not missing, f"{doc.name} names files the repository does not hold: {missing}"


def test_benchmark_numbers_in_docs_match_the_raw_results():
    """The seed/tuned numbers BENCHMARKS.md quotes are the ones in the committed bench.json of the run they cite
    (experiments/vlm-grpo/bench-results/), so a re-run cannot leave stale numbers behind; the guide quotes the ratio
    with how it was measured."""
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
        "seed peak": f"{max(seed['nvidia_smi_peak_mib'].values()) / 1024:.1f} GiB",
        "tuned peak": f"{max(tuned['nvidia_smi_peak_mib'].values()) / 1024:.1f} GiB",
    }
    text = (REPO / "experiments/vlm-grpo/BENCHMARKS.md").read_text()
    missing = {k: v for k, v in quoted.items() if v not in text}
    assert not missing, f"BENCHMARKS.md does not quote {missing}"
    # wherever the guide quotes the ratio, it says it was measured with transformers generation
    guide = _flat(GUIDE.read_text())
    assert f"{ratio} the seed's samples/s with transformers generation, not vLLM" in guide
    # The tuned flags the guide recommends are the ones that were measured.
    tuned_flags = " ".join(tuned["script_args"])
    recommended = re.search(r'make flexai-train ARGS="(--per_device_train_batch_size[^"]+)"', GUIDE.read_text()).group(1)
    assert recommended in tuned_flags


def test_data_preparation_numbers_in_docs_match_the_raw_results():
    """The data-preparation numbers INTERNALS.md quotes are those of the committed measurement files."""
    results = REPO / "experiments/vlm-grpo/data-prep-results"
    cold = json.loads((results / "scale-7700-2proc-cold.json").read_text())
    cached = json.loads((results / "scale-7700-2proc-cached.json").read_text())
    survey = json.loads((results / "scale-7700-dry-run.json").read_text())
    prep, wait = cold["processes"]
    data = survey["plan"]["data"]
    assert cold["rows"] == 7700 and cold["kept_fraction"] >= 0.99  # the bar: >= 99 % of rows kept
    assert len(cold["processes"]) == 2 and prep["cache_files"] == wait["cache_files"]
    downscaled = int(re.search(r"(\d+) downscaled", cold["summary"]).group(1))
    quoted = {
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
    text = _flat(INTERNALS.read_text())  # line breaks of the Markdown source do not matter
    missing = {k: v for k, v in quoted.items() if v not in text}
    assert not missing, f"INTERNALS.md does not quote {missing}"


# --- every measured number of the three documents, against the raw file it comes from (issue 12, item 5) ----------

EXP = REPO / "experiments" / "vlm-grpo"
README = REPO / "README.md"
BENCHMARKS = EXP / "BENCHMARKS.md"
NEAR = 1000  # characters (whitespace-normalized) either side of a quoted number within which the raw file is linked


def _raw(rel: str):
    path = EXP / rel
    return json.loads(path.read_text()) if path.suffix == ".json" else path.read_text()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _per_rank(result: dict) -> list[dict]:
    ranks = result["per_rank"]
    return json.loads(ranks) if isinstance(ranks, str) else ranks


def _bench(rel: str) -> dict[str, dict]:
    return {r["name"]: r for r in _raw(rel)["results"]}


def _peak_gib(result: dict) -> float:
    return max(result["nvidia_smi_peak_mib"].values()) / 1024


def _ratio(rel: str) -> float:
    r = _bench(rel)
    return r["tuned"]["samples_per_s"] / r["seed"]["samples_per_s"]


def _timings(i: int) -> dict:
    return _raw("cpu-results/setup-and-timings.json")["runs"][i]


def _split(prefix: str) -> int:  # the set-up split of the fresh-clone `make smoke`, by the start of its label
    return next(v for k, v in _timings(0)["split_s"].items() if k.startswith(prefix))


def _du(name: str) -> str:
    return re.search(rf"^(\S+)\s+{re.escape(name)}$", _raw("cpu-results/venv-size.txt"), re.M).group(1)


def _gb(du_size: str) -> str:  # du -h's 542M -> "0.5 GB", 8.3G -> "8.3 GB"
    value = float(du_size[:-1]) / (1024 if du_size.endswith("M") else 1)
    return f"{value:.1f} GB"


B1, B2, B3 = ("bench-results/1-upstream-vision-loop.json", "bench-results/2-batched-vision.json",
              "bench-results/3-batched-vision-zero3-knobs.json")
TIMINGS = "cpu-results/setup-and-timings.json"
SPEEDUPS = "cpu-results/suite-speedups.json"  # tests/time_launch.py: one launch per start-up variant
MAKE_TEST = "cpu-results/make-test.json"  # `make test` in a fresh clone, at the commit it records (test_suite_bounds)
WORKERS = "cpu-results/make-test-workers.json"  # the suite in one process against 2 xdist workers (tests/conftest.py)
DRY = "data-prep-results/scale-7700-dry-run.json"


def _default_steps(processes: int = 2) -> int:
    """Optimizer steps of the seed's command: 3 epochs (TRL's default num_train_epochs) of per_device 8 x processes
    completions = 2 prompts per step over the rows `--dry_run` counted (grpo_vlm.batch_plan's arithmetic)."""
    plan = _raw(DRY)["plan"]
    assert plan["processes"] == 1 and plan["steps"] == 3 * plan["train_rows"] // plan["prompts_per_step"]
    return math.ceil(3 * plan["train_rows"] / (8 * processes / 8))
COLD, CACHED = "data-prep-results/scale-7700-2proc-cold.json", "data-prep-results/scale-7700-2proc-cached.json"
DEMO, DEMO_EVAL = "cpu-results/learning-demo.json", "cpu-results/learning-demo-eval.json"


def _bench_row(rel: str, name: str) -> str:
    r = _bench(rel)[name]
    return (f"| {r['step_s']:.2f} | {r['completions_per_step']:.0f} | **{r['samples_per_s']:.2f}** | "
            f"{r['gen_tok_s_per_gpu']:.0f} | {r['train_tok_s_per_gpu']:,.0f} | {r['train_tflops_per_gpu']:.0f} | "
            f"**{100 * r['mfu']:.1f} %** | {100 * r['model_mfu']:.1f} % | {r['peak_allocated_gib']:.1f} GiB | "
            f"{r['peak_reserved_gib']:.1f} GiB | **{_peak_gib(r):.1f} GiB** |")


def _phase_row(rel: str, name: str) -> str:
    r = _bench(rel)[name]
    p = r["phases_per_step"]
    p = json.loads(p) if isinstance(p, str) else p
    cells = [p[k] for k in ("rollout", "generation", "reward", "forward", "vision_in_forward", "backward", "optimizer")]
    return f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {r['step_s']:.2f} |"


def _call_row(rel: str) -> str:
    r = _bench(rel)
    seed, tuned = r["seed"], r["tuned"]
    p = tuned["phases_per_step"]
    p = json.loads(p) if isinstance(p, str) else p
    return (f"| {seed['step_s']:.2f} | {tuned['step_s']:.2f} | {p['forward']:.2f} + {p['backward']:.2f} | "
            f"{tuned['train_tflops_per_gpu']:.0f} | {100 * tuned['mfu']:.1f} % | {_ratio(rel):.2f}× |")


def _matmul(rel: str, gpus) -> float:
    rates = {m["gpu"]: m["tflops"] for m in _raw(rel)["matmul_bf16"]}
    return sum(rates[g] for g in gpus) / len(gpus)


def _flops(rel: str, name: str) -> dict:
    return _per_rank(_bench(rel)[name])[0]["flops_per_step"]


def _phases(rel: str, name: str) -> dict:
    p = _bench(rel)[name]["phases_per_step"]
    return json.loads(p) if isinstance(p, str) else p


def _seed_flops_text() -> str:
    f = _flops(B3, "seed")
    total = f["fwd"] + f["bwd"] + f["recompute"]
    return (f"{f['fwd']:.2e} forward (vision {f['vision']:.2e} of it, {f['vision'] / 8:.2e} per image), "
            f"{f['bwd']:.2e} backward and {f['recompute']:.2e} recompute, **{total:.2e} FLOPs**").replace("e+", "e")


def _tuned_flops_text() -> str:
    f, p = _flops(B3, "tuned"), _phases(B3, "tuned")
    bwd = f["bwd"] + f["recompute"]
    return (f"{bwd:.2e} FLOPs / {p['backward']:.2f} s = {bwd / p['backward'] / 1e12:.0f} TFLOP/s").replace("e+", "e")


def _vision_text() -> str:
    f, p = _flops(B3, "tuned"), _phases(B3, "tuned")
    return f"{f['vision']:.1e} FLOPs in {p['vision_in_forward']:.2f} s".replace("e+", "e")


def _wall_range() -> str:
    walls = [r["wall_s"] for rel in (B1, B2, B3) for r in _bench(rel).values()]
    return f"{min(walls):.0f}-{max(walls):.0f} s"


def _tied_ratio_range() -> str:
    ratios = _raw("cpu-results/vllm-lora-on-tied-lm-head.json")["tied_lm_head"]["importance_sampling_ratio_mean"]
    return f"{min(ratios):.4f} to {max(ratios):.1f}"


def _is_ratio_range(rel: str, sep: str, digits: int) -> str:
    ratios = [e["sampling/importance_sampling_ratio/mean"] for e in _raw(rel)["log_history"]
              if "sampling/importance_sampling_ratio/mean" in e]
    return f"{min(ratios):.{digits}f}{sep}{max(ratios):.{digits}f}"


# Issue 11: figures derived from calls 1-3 (scripts/bench.py --refigure), the vLLM path's trainer side (calls 4, 5)
F3 = "bench-results/3-batched-vision-zero3-knobs.figures.json"
B4, B5 = "bench-results/4-vllm-stand-in-first.json", "bench-results/5-vllm-stand-in.json"


def _fig(name: str) -> dict:
    return {r["name"]: r for r in _raw(F3)["results"]}[name]


def _fig_row(name: str) -> str:
    f = _fig(name)
    return "| {} | {:.1f} % | {:.1f} % | {:.1f} % | {:.1f} % | {:,.0f} |".format(
        name, 100 * f["train_mfu"], 100 * f["train_hfu"], 100 * f["train_hfu_vs_matmul"], 100 * f["step_mfu"],
        f["e2e_tok_s_per_gpu"])


def _b5_row(name: str) -> str:
    r = _bench(B5)[name]
    per = f"{r['trainer_side_s_per_completion']:.3f}"
    if not name.endswith("-trl"):
        per = f"**{per} ({_b5_side(name):.2f}×)**"
    return "| {} | {:.2f} | {:.0f} | {} | {:.2f} | {:,.0f} | {:.1f} % | {:.1f} % | {:.1f} % | {:.1f} GiB |".format(
        name, r["step_s"], r["completions_per_step"], per, r["samples_per_s"], r["e2e_tok_s_per_gpu"],
        100 * r["train_mfu"], 100 * r["train_hfu"], 100 * r["step_mfu"], r["peak_allocated_gib"])


def _b5_side(name: str, rel: str = B5) -> float:
    r = _bench(rel)
    return r[name]["trainer_side_s_per_completion"] / r[f"{name}-trl"]["trainer_side_s_per_completion"]


def _b5_phase_row(name: str) -> str:
    p = _bench(B5)[name]["phases_per_step"]
    rest = p["rollout"] - p["weight_sync"] - p.get("logps_nograd", 0)
    nograd = f"{p['logps_nograd']:.2f}" if "logps_nograd" in p else "-"
    return (f"| {name} | {p['weight_sync']:.2f} | {nograd} | {rest:.2f} | {p['forward']:.2f} | {p['backward']:.2f} | "
            f"{p['optimizer']:.2f} | {_bench(B5)[name]['step_s']:.2f} |")


def _b5_mem_row(name: str) -> str:
    m = _bench(B5)[name]["phase_peak_gib"]
    cells = [f"{m[k]:.1f} (+{m[k + '_extra']:.1f}) GiB" if k in m else "-"
             for k in ("weight_sync", "logps_nograd", "forward", "backward")]
    return f"| {name} | " + " | ".join(cells) + " |"


def _h200_mib() -> int:
    return int(re.search(r"NVIDIA H200, (\d+) MiB", _raw("bench-results/5-vllm-stand-in.device-output.txt")).group(1))


def _sync(name: str, way: str, key: str) -> float:
    return _bench(B5)[name]["sync_compare"]["0"][way][key]


QUOTES = [
    # README.md
    (README, TIMINGS, lambda: f"{_split('set-up total')} s of set-up, of which "
                              f"{_split('vLLM 0.11.0 CPU build')} s building vLLM"),
    (README, TIMINGS, lambda: f"{_timings(1)['wall_s']:.0f} s after set-up"),
    (README, TIMINGS, lambda: f"set-up from nothing {_split('set-up total')} s"),
    (README, TIMINGS, lambda: f"{_timings(2)['max_rss_kib_of_the_largest_process'] / 1024**2:.1f} GiB peak RSS"),
    (README, MAKE_TEST, lambda: "{:.0f} s, of which {:.0f} s of tests ({} tests, at commit {})".format(
        _raw(MAKE_TEST)["wall_s"], _raw(MAKE_TEST)["pytest_s"], _raw(MAKE_TEST)["tests"], _raw(MAKE_TEST)["commit"][:7])),
    (README, "cpu-results/venv-size.txt", lambda: f"{_gb(_du('.venv'))} of disk"),
    (README, "cpu-results/venv-size.txt", lambda: f"{_gb(_du('nvidia'))} of NVIDIA's CUDA wheels, "
                                                  f"{_gb(_du('total'))} of CUDA libraries inside torch, "
                                                  f"{_gb(_du('triton'))} of triton"),
    # README's at-a-glance block (issue 21): the default run's steps, the measured step times and what they imply
    (README, DRY, lambda: f"{_default_steps():,} steps for the {_raw(DRY)['plan']['train_rows']:,} training rows"),
    (README, DRY, lambda: f"a copy of the default dataset's shape, {_raw(DRY)['plan']['data']['rows']:,} rows"),
    (README, B5, lambda: f"{_bench(B5)['seed']['step_s']:.2f} s on 2×H200"),
    (README, B5, lambda: "step 200 comes after at least {:.1f} min and {:,} steps take at least {:.1f} GPU-hours".format(
        200 * _bench(B5)["seed"]["step_s"] / 60, _default_steps(), 2 * _default_steps() * _bench(B5)["seed"]["step_s"] / 3600)),
    (README, B3, lambda: f"instead of vLLM a step took {_bench(B3)['seed']['step_s']:.1f} s"),
    (README, B5, lambda: "the seed: {:.1f} of {:.1f} GiB per H100".format(
        _peak_gib(_bench(B5)["seed"]) + 0.3 * 81559 / 1024, 81559 / 1024)),
    (README, DEMO, lambda: f"training reward {_raw(DEMO)['train_rewards_first5']:.2f} → {_raw(DEMO)['train_rewards_last5']:.2f}"),
    (README, DEMO, lambda: "held-out `digit_ratio` {:.3f} → {:.3f}".format(
        _raw(DEMO)["heldout_digit_ratio"]["base"], _raw(DEMO)["heldout_digit_ratio"]["adapter"])),
    # INTERNALS.md (moved from the guide: the learning demonstration, data preparation, the ledger, faults, fast paths)
    (INTERNALS, DEMO, lambda: f"training reward {_raw(DEMO)['train_rewards_first5']:.2f} → {_raw(DEMO)['train_rewards_last5']:.2f}"),
    (INTERNALS, DEMO, lambda: f"`digit_ratio` {_raw(DEMO)['heldout_digit_ratio']['base']:.3f} for the base model vs "
                          f"{_raw(DEMO)['heldout_digit_ratio']['adapter']:.3f} for the adapter"),
    (INTERNALS, DEMO, lambda: f"{_raw(DEMO)['train_seconds']} s of training and {_raw(DEMO)['eval_seconds']} s of evaluation"),
    (INTERNALS, DEMO_EVAL, lambda: "accuracy {:.3f} for the base model ({} of {} answers".format(
        _raw(DEMO_EVAL)["models"]["base"]["scores"]["accuracy"],
        round(_raw(DEMO_EVAL)["models"]["base"]["scores"]["accuracy"] * _raw(DEMO_EVAL)["models"]["base"]["scores"]["completions"]),
        _raw(DEMO_EVAL)["models"]["base"]["scores"]["completions"])),
    (INTERNALS, DEMO_EVAL, lambda: "({} of {} held-out answers of the base model".format(
        round(_raw(DEMO_EVAL)["models"]["base"]["scores"]["accuracy"] * _raw(DEMO_EVAL)["models"]["base"]["scores"]["completions"]),
        _raw(DEMO_EVAL)["models"]["base"]["scores"]["completions"])),
    (GUIDE, B3, lambda: f"({100 * _phases(B3, 'seed')['generation'] / _bench(B3)['seed']['step_s']:.0f} % of the seed's step"),
    (GUIDE, B3, lambda: f"measured {_ratio(B3):.2f}× the seed's samples/s with transformers generation, not vLLM"),
    (INTERNALS, COLD, lambda: f"Peak RSS includes the {_raw(COLD)['processes'][0]['peak_rss_mib_before_preparation']:,} MiB"),
    (INTERNALS, "data-prep-results/scale-7700-dry-run.json", lambda: "JPEG images {}–{} px a side, {} MB".format(
        min(_raw("data-prep-results/scale-7700-dry-run.json")["plan"]["data"][k]["min"] for k in ("image_width", "image_height")),
        max(_raw("data-prep-results/scale-7700-dry-run.json")["plan"]["data"][k]["max"] for k in ("image_width", "image_height")),
        re.search(r"(\d+) MB", " ".join(_raw("data-prep-results/scale-7700-dry-run.json")["setup"])).group(1))),
    (INTERNALS, COLD, lambda: "(load average {:.1f} to {:.1f})".format(
        *sorted((_raw(COLD)["machine"]["load_average_at_start"][0], _raw(COLD)["machine"]["load_average_at_end"][0])))),
    (INTERNALS, "cpu-results/vllm-colocate-weight-check-without-m10-fix.json",
     lambda: _is_ratio_range("cpu-results/vllm-colocate-weight-check-without-m10-fix.json", "–", 2)),
    (INTERNALS, "cpu-results/vllm-lora-on-tied-lm-head.json", _tied_ratio_range),
    # BENCHMARKS.md
    (BENCHMARKS, B3, lambda: "| seed | 3 " + _bench_row(B3, "seed")),
    (BENCHMARKS, B3, lambda: "| tuned | 2 (timeout in step 4) " + _bench_row(B3, "tuned")),
    (BENCHMARKS, B3, lambda: f"**tuned / seed = {_ratio(B3):.2f}× samples/s.**"),
    (BENCHMARKS, B3, lambda: "tuned {} (call 3), {} (call 2); seed {:.1f} %".format(
        " / ".join(f"{100 * r['mfu']:.1f} %" for r in _per_rank(_bench(B3)["tuned"])),
        " / ".join(f"{100 * r['mfu']:.1f} %" for r in _per_rank(_bench(B2)["tuned"])), 100 * _bench(B3)["seed"]["mfu"])),
    (BENCHMARKS, B3, lambda: ", ".join(f"{m['tflops']:.0f}" for m in _raw(B3)["matmul_bf16"]) + " TFLOP/s on GPUs 0-3"),
    (BENCHMARKS, B3, lambda: _phase_row(B3, "seed")),
    (BENCHMARKS, B3, lambda: _phase_row(B3, "tuned")),
    (BENCHMARKS, B1, lambda: _call_row(B1)),
    (BENCHMARKS, B2, lambda: _call_row(B2)),
    (BENCHMARKS, B3, lambda: _call_row(B3)),
    (BENCHMARKS, B3, lambda: "**{:.0f} ms / {:.0f} ms with the upstream loop, {:.0f} ms / {:.0f} ms batched".format(
        _raw(B2)["vision_tower"]["upstream_loop_ms"], _raw(B3)["vision_tower"]["upstream_loop_ms"],
        _raw(B2)["vision_tower"]["batched_ms"], _raw(B3)["vision_tower"]["batched_ms"])),
    (BENCHMARKS, B3, lambda: f"({_matmul(B3, (2, 3)):.0f} vs {_matmul(B2, (2, 3)):.0f} TFLOP/s)"),
    (BENCHMARKS, B3, lambda: f"({_peak_gib(_bench(B3)['tuned']):.1f} vs {_peak_gib(_bench(B2)['tuned']):.1f} GiB)"),
    (BENCHMARKS, B3, lambda: f"{_bench(B2)['seed']['step_s']:.1f} vs {_bench(B3)['seed']['step_s']:.1f} s per step"),
    (BENCHMARKS, B3, lambda: f"{_ratio(B3):.2f}× (call 3), {_ratio(B2):.2f}× (call 2), {_ratio(B1):.2f}× (call 1)"),
    (BENCHMARKS, B3, lambda: f"(`vision_in_forward`, {_phases(B3, 'seed')['vision_in_forward']:.2f} s for 8 images)"),
    (BENCHMARKS, B3, lambda: "Its forward runs at {:.0f}\n TFLOP/s, its backward with recomputation at {:.0f}".format(
        _flops(B3, "seed")["fwd"] / _phases(B3, "seed")["forward"] / 1e12,
        (_flops(B3, "seed")["bwd"] + _flops(B3, "seed")["recompute"]) / _phases(B3, "seed")["backward"] / 1e12)),
    (BENCHMARKS, B3, _tuned_flops_text),
    (BENCHMARKS, B3, _vision_text),
    (BENCHMARKS, B3, lambda: "moves {:,.0f} tokens per GPU in {:.1f} s, {:,.0f} tokens/s/GPU".format(
        _per_rank(_bench(B3)["tuned"])[0]["train_tokens_padded_per_step"], _bench(B3)["tuned"]["step_s"],
        _per_rank(_bench(B3)["tuned"])[0]["train_tokens_padded_per_step"] / _bench(B3)["tuned"]["step_s"])),
    (BENCHMARKS, B3, lambda: f"({100 * _phases(B3, 'tuned')['generation'] / _bench(B3)['tuned']['step_s']:.0f} % of the step)"),
    (BENCHMARKS, B3, lambda: "64 sequences took {:.1f} s where 8 took {:.1f} s, {:.1f}× the generated tokens per second "
                             "({:.0f} vs {:.0f} per GPU)".format(
        _phases(B3, "tuned")["generation"], _phases(B3, "seed")["generation"],
        _bench(B3)["tuned"]["gen_tok_s_per_gpu"] / _bench(B3)["seed"]["gen_tok_s_per_gpu"],
        _bench(B3)["tuned"]["gen_tok_s_per_gpu"], _bench(B3)["seed"]["gen_tok_s_per_gpu"])),
    (BENCHMARKS, B3, lambda: "from {:.0f} to {:.0f} TFLOP/s".format(
        _bench(B3)["seed"]["train_tflops_per_gpu"], _bench(B3)["tuned"]["train_tflops_per_gpu"])),
    (BENCHMARKS, B2, lambda: ", ".join(f"{s:.1f}" for s in _per_rank(_bench(B2)["tuned"])[0]["step_s"]) + " s"),
    (BENCHMARKS, B3, _wall_range),
    (BENCHMARKS, B3, _seed_flops_text),
    (BENCHMARKS, B3, lambda: "the seed took {:.2f} s".format(
        _phases(B3, "seed")["forward"] + _phases(B3, "seed")["backward"])),
    (BENCHMARKS, B3, lambda: f"{_peak_gib(_bench(B3)['seed']):.1f} GiB nvidia-smi peak per GPU"),
    (BENCHMARKS, B5, lambda: "{:.1f} of {:.1f} GiB on an 80 GB H100".format(  # the Goals row: the table's sum
        _peak_gib(_bench(B5)["seed"]) + 0.3 * 81559 / 1024, 81559 / 1024)),
    (BENCHMARKS, "cpu-results/vllm-colocate-weight-check.json",
     lambda: _is_ratio_range("cpu-results/vllm-colocate-weight-check.json", "–", 3)),
    # the suite's time (INTERNALS.md): one launch per start-up variant, a refusal forked or not, make test
    (INTERNALS, SPEEDUPS, lambda: "The launch: {:.1f} s → {:.1f} s (means of 2).".format(
        _mean(_raw(SPEEDUPS)["summary"]["no_inductor_env"]["wall_s"]),
        _mean(_raw(SPEEDUPS)["summary"]["suite"]["wall_s"]))),
    (INTERNALS, SPEEDUPS, lambda: "exit, {:.1f} s → {:.1f} s (means of 2)".format(
        _mean(_raw(SPEEDUPS)["summary"]["no_exit_freeze"]["saved_to_exit_s"]),
        _mean(_raw(SPEEDUPS)["summary"]["suite"]["saved_to_exit_s"]))),
    (INTERNALS, SPEEDUPS, lambda: "refusal takes {:.1f} s instead of {:.1f} s (means of 2)".format(
        _mean(_raw(SPEEDUPS)["one_process_refusal"]["fork_s"]),
        _mean(_raw(SPEEDUPS)["one_process_refusal"]["real_process_s"]))),
    (INTERNALS, SPEEDUPS, lambda: "does nothing: {:.1f} s with a real launcher, {:.1f} s with a forked one (means of "
     "2)".format(_mean(_raw(SPEEDUPS)["noop_launch"]["real_process_s"]), _mean(_raw(SPEEDUPS)["noop_launch"]["fork_s"]))),
    (INTERNALS, SPEEDUPS, lambda: "launch above: {:.1f} s → {:.1f} s with a forked launcher (means of 2)".format(
        _mean(_raw(SPEEDUPS)["summary"]["suite"]["wall_s"]),
        _mean(_raw(SPEEDUPS)["summary"]["forked_launcher"]["wall_s"]))),
    (INTERNALS, MAKE_TEST, lambda: "CI machine: {:.0f} s, set-up included".format(_raw(MAKE_TEST)["wall_s"])),
    (INTERNALS, WORKERS, lambda: "left the 2 cores {:.0f} % idle on average".format(
        _raw(WORKERS)["one_worker"]["cpu_idle_percent_mean"])),
    (INTERNALS, WORKERS, lambda: "{:.1f} s of tests in one process and {:.1f} s in two workers, {:.1f} % idle".format(
        _raw(WORKERS)["one_worker"]["pytest_s"], _raw(WORKERS)["two_workers"]["pytest_s"],
        _raw(WORKERS)["two_workers"]["cpu_idle_percent_mean"])),
    (INTERNALS, WORKERS, lambda: "setup takes {:.1f} s in one process".format(
        _raw(WORKERS)["two_workers_spinning"]["box_learning_setup_one_worker_s"])),
    (INTERNALS, WORKERS, lambda: "busy processes: {:.1f} s spinning, {:.1f} s passive".format(
        _raw(WORKERS)["openmp_wait"]["runs_s"]["beside 2 busy processes"],
        _raw(WORKERS)["openmp_wait"]["runs_s"]["beside 2 busy processes, OMP_WAIT_POLICY=PASSIVE"])),
    # the fault table (INTERNALS.md), row for row as tests/test_faults.py recorded it
    (INTERNALS, "cpu-results/faults.json", lambda: "\n".join("| {} | {} | {} | {} | {} |".format(
        r["fault"], r["injected"], "yes" if r["survived"] else "no", r["steps_lost"], r["user_sees"])
        for r in _raw("cpu-results/faults.json")["rows"])),
    # issue 11: names and units (calls 1-3 refigured) and the vLLM path's trainer side (calls 4 and 5)
    (BENCHMARKS, F3, lambda: _fig_row("seed")),
    (BENCHMARKS, F3, lambda: _fig_row("tuned")),
    (BENCHMARKS, B5, lambda: "was {:.0f} and {:.0f} TFLOP/s".format(*(m["tflops"] for m in _raw(B5)["matmul_bf16"]))),
    (BENCHMARKS, B5, lambda: "HFU vs matmul is {:.1f}× HFU".format(
        _bench(B5)["tuned"]["train_hfu_vs_matmul"] / _bench(B5)["tuned"]["train_hfu"])),
    *[(BENCHMARKS, B5, lambda n=n: _b5_row(n)) for n in ("seed-trl", "seed", "tuned-trl", "tuned")],
    *[(BENCHMARKS, B5, lambda n=n: _b5_phase_row(n)) for n in ("seed-trl", "seed", "tuned-trl", "tuned")],
    *[(BENCHMARKS, B5, lambda n=n: _b5_mem_row(n)) for n in ("seed-trl", "seed", "tuned-trl", "tuned")],
    (BENCHMARKS, B5, lambda: "**{:.2f} GiB layer by layer**".format(_sync("seed", "layerwise", "gathered_at_handoff_gib"))),
    (BENCHMARKS, B5, lambda: "**against {:.2f} GiB** (seed) and {:.2f} GiB (tuned".format(
        _sync("seed", "trl", "gathered_at_handoff_gib"), _sync("tuned", "trl", "gathered_at_handoff_gib"))),
    (BENCHMARKS, B5, lambda: "{:.2f} GiB against {:.2f} GiB (seed). {} tensors".format(
        _sync("seed", "layerwise", "peak_extra_gib"), _sync("seed", "trl", "peak_extra_gib"),
        _sync("seed", "trl", "tensors"))),
    (BENCHMARKS, B5, lambda: "{:.2f}-{:.2f} s either way".format(
        min(r["phases_per_step"]["weight_sync"] for r in _bench(B5).values()),
        max(r["phases_per_step"]["weight_sync"] for r in _bench(B5).values()))),
    (BENCHMARKS, B5, lambda: "not met, {:.2f}×** ({:.4f} → {:.4f} s), seed {:.2f}×".format(
        _b5_side("tuned"), _bench(B5)["tuned-trl"]["trainer_side_s_per_completion"],
        _bench(B5)["tuned"]["trainer_side_s_per_completion"], _b5_side("seed"))),
    (BENCHMARKS, B5, lambda: "was {:.2f} s of the tuned {:.2f} s step".format(
        _bench(B5)["tuned-trl"]["phases_per_step"]["logps_nograd"], _bench(B5)["tuned-trl"]["step_s"])),
    (BENCHMARKS, B4, lambda: "gave {:.2f}× for tuned".format(_b5_side("tuned", B4))),
    (BENCHMARKS, B4, lambda: "its seed steps {:.2f} and {:.2f} s".format(*_per_rank(_bench(B4)["seed"])[0]["step_s"])),
    (BENCHMARKS, B5, lambda: "the rest of the tuned rollout, {:.2f} s".format(
        _bench(B5)["tuned"]["phases_per_step"]["rollout"] - _bench(B5)["tuned"]["phases_per_step"]["weight_sync"])),
    (BENCHMARKS, B5, lambda: "spends {:.2f} of its {:.2f} s".format(  # cumtime: the 4th column of cProfile's table
        float(re.search(r"^\s*\S+\s+\S+\s+\S+\s+(\S+)\s+\S+\s+\S*image_processing_utils_fast.py:\d+\(__call__\)",
                        _bench(B5)["tuned"]["rollout_profile"], re.M).group(1)),
        float(re.search(r"in (\d+\.\d+) seconds", _bench(B5)["tuned"]["rollout_profile"]).group(1)))),
    (BENCHMARKS, B5, lambda: "(+{:.1f} GiB in `weight_sync`, against +{:.1f})".format(
        _bench(B5)["tuned"]["phase_peak_gib"]["weight_sync_extra"], _bench(B5)["tuned-trl"]["phase_peak_gib"]["weight_sync_extra"])),
    (BENCHMARKS, B5, lambda: "peaks {:.1f} GiB above its start".format(_bench(B5)["seed"]["phase_peak_gib"]["weight_sync_extra"])),
    (BENCHMARKS, B5, lambda: "({:.1f} vs {:.1f} GiB with TRL's sync)".format(
        _bench(B5)["seed"]["phase_peak_gib"]["reward"], _bench(B5)["seed-trl"]["phase_peak_gib"]["reward"])),
    (BENCHMARKS, B5, lambda: "rose from {:.1f} to {:.1f} GiB".format(
        _bench(B5)["seed-trl"]["peak_allocated_gib"], _bench(B5)["seed"]["peak_allocated_gib"])),
    (BENCHMARKS, B5, lambda: "went from {:.1f} to {:.1f} GiB".format(
        _bench(B5)["tuned-trl"]["peak_allocated_gib"], _bench(B5)["tuned"]["peak_allocated_gib"])),
    *[(BENCHMARKS, B5, lambda n=n: "| {} | {:.1f} GiB | {:.1f} of 79.6 GiB | {:.1f} of {:.1f} GiB |".format(
        n, _peak_gib(_bench(B5)[n]), _peak_gib(_bench(B5)[n]) + 0.3 * 81559 / 1024,
        _peak_gib(_bench(B5)[n]) + 0.3 * _h200_mib() / 1024, _h200_mib() / 1024)) for n in ("seed", "tuned")],
    (BENCHMARKS, "bench-results/5-vllm-stand-in.device-output.txt",
     lambda: "{:.1f} GiB of an H200's {:,} MiB".format(0.3 * _h200_mib() / 1024, _h200_mib())),
    (BENCHMARKS, B5, lambda: "peaked at {:.1f} GiB (seed) and {:.1f} GiB (tuned)".format(
        _peak_gib(_bench(B5)["seed-trl"]), _peak_gib(_bench(B5)["tuned-trl"]))),
    (BENCHMARKS, B5, lambda: "{:.1f}-{:.1f} GiB seed, {:.1f}-{:.1f} GiB tuned); TRL's sync adds {:.1f}-{:.1f} GiB".format(
        *sorted(_bench(B5)[n]["phase_peak_gib"]["backward"] for n in ("seed-trl", "seed")),
        *sorted(_bench(B5)[n]["phase_peak_gib"]["backward"] for n in ("tuned-trl", "tuned")),
        *sorted(_bench(B5)[n]["phase_peak_gib"]["weight_sync_extra"] for n in ("tuned-trl", "seed-trl")))),
    (BENCHMARKS, "bench-results/cpu-image-dedupe.json", lambda: "distinct) from {:.2f} to {:.2f} s".format(
        _raw("bench-results/cpu-image-dedupe.json")["result"]["upstream_s"],
        _raw("bench-results/cpu-image-dedupe.json")["result"]["deduped_s"])),
    (INTERNALS, B5, lambda: "({:.2f} GiB held at once instead of {:.2f} GiB".format(
        _sync("seed", "layerwise", "gathered_at_handoff_gib"), _sync("seed", "trl", "gathered_at_handoff_gib"))),
    (INTERNALS, B5, lambda: "{:.2f}× TRL's for the seed, {:.2f}× for".format(_b5_side("seed"), _b5_side("tuned"))),
    # the guide's healthy-metrics table: the importance-sampling ratio the tiny model logs through vLLM
    (GUIDE, "cpu-results/vllm-colocate-weight-check.json",
     lambda: _is_ratio_range("cpu-results/vllm-colocate-weight-check.json", "–", 3) + " on the tiny model"),
    (INTERNALS, "cpu-results/vllm-colocate-weight-check.json",
     lambda: _is_ratio_range("cpu-results/vllm-colocate-weight-check.json", "–", 3)),
    (INTERNALS, "cpu-results/learning-demo-vllm.json", lambda: "reward {:.2f} → {:.2f}".format(
        _raw("cpu-results/learning-demo-vllm.json")["train_rewards_first5"],
        _raw("cpu-results/learning-demo-vllm.json")["train_rewards_last5"])),
    (INTERNALS, "cpu-results/faults.json", lambda: "`accelerate launch` itself exits with {}".format(next(
        r for r in _raw("cpu-results/faults.json")["rows"] if r["fault"] == "SIGTERM mid-step")["launcher_exit_status"])),
    # the guide's Multi-node section: the torchrun + --deepspeed JSON route on 2 GPUs (issue 10, item 2)
    (INTERNALS, "bench-results/torchrun-deepspeed-json-3b-2xh200.json", lambda: "3 steps in {} s, {:,} MiB peak per GPU".format(
        ", ".join(f"{s:.1f}" for s in _raw("bench-results/torchrun-deepspeed-json-3b-2xh200.json")["step_time_s"]),
        max(_raw("bench-results/torchrun-deepspeed-json-3b-2xh200.json")["nvidia_smi_peak_mib"].values()))),
]

# Numbers that had no raw file and were taken out; they must not come back without one.
REMOVED = [
    # superseded memory totals (issue 21): the vLLM-path sums of BENCHMARKS' "Memory per GPU" table replace them
    (GUIDE, "56 GiB"), (BENCHMARKS, "about 56 GiB"), (BENCHMARKS, "71.9 GiB"), (GUIDE, "72 GiB"),
    (BENCHMARKS, "under 70 GiB per GPU"),
    (README, "29.9 / 17.9 / 14.2"), (README, "~10 s"), (README, "26.35s/it"),
    (GUIDE, "seen: step"), (GUIDE, "3 of 6 runs"), (GUIDE, "5 of 5 runs"), (GUIDE, "about 2 minutes"),
    (GUIDE, "~100 s per step"), (GUIDE, "40-byte"),
    (BENCHMARKS, "about 25 s"), (BENCHMARKS, "120-150 s"), (BENCHMARKS, "438 MB"), (BENCHMARKS, "about 15 minutes"),
    (BENCHMARKS, "64 s it took alone"),
]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _links(doc) -> list[tuple[int, pathlib.Path]]:
    """(position in the whitespace-normalized text, resolved target) of every relative link of doc."""
    text = _flat(doc.read_text())
    return [(m.start(), (doc.parent / m.group(1)).resolve())
            for m in re.finditer(r"\]\((?!https?://|#)([^)#\s]+)", text)]


@pytest.mark.parametrize("doc,raw,quote", QUOTES, ids=lambda v: v.name if hasattr(v, "name") else None)
def test_every_quoted_number_matches_its_raw_file_and_links_it(doc, raw, quote):
    """The document quotes the number as the raw file gives it, and links that raw file (or its folder) near it."""
    expected = _flat(quote())
    text = _flat(doc.read_text())
    positions = [m.start() for m in re.finditer(re.escape(expected), text)]
    assert positions, f"{doc.name} does not quote {expected!r} (computed from {raw})"
    target = (EXP / raw).resolve()
    links = [pos for pos, path in _links(doc) if path in (target, target.parent)]
    for pos in positions:
        assert any(abs(link - pos) <= NEAR for link in links), \
            f"{doc.name}: {expected!r} has no link to {raw} within {NEAR} characters"


def test_both_gpus_of_a_pair_agree_as_benchmarks_says():
    assert "In call 3 the two GPUs of a pair agree within 0.1 point of MFU" in _flat(BENCHMARKS.read_text())
    for result in _bench(B3).values():
        mfus = [100 * r["mfu"] for r in _per_rank(result)]
        assert max(mfus) - min(mfus) < 0.1, (result["name"], mfus)


@pytest.mark.parametrize("doc,text", REMOVED, ids=lambda v: v.name if hasattr(v, "name") else v)
def test_numbers_without_a_raw_file_stay_out(doc, text):
    assert text not in doc.read_text()


@pytest.mark.parametrize("doc", [GUIDE, README, BENCHMARKS, INTERNALS], ids=lambda p: str(p.relative_to(REPO)))
def test_raw_and_results_links_point_at_existing_files(doc):
    text = doc.read_text()
    raw_links = re.findall(r"\[raw\]\(([^)#\s]+)\)", text)
    results = re.findall(r"\]\(([^)#\s]*(?:bench|cpu|data-prep)-results/[^)#\s]*)\)", text)
    assert raw_links or results
    for link in raw_links + results:
        path = doc.parent / link
        assert path.is_file() or (link.endswith("/") and path.is_dir() and any(path.iterdir())), f"{doc.name}: {link}"
    for link in raw_links:
        assert (doc.parent / link).is_file(), f"{doc.name}: [raw]({link}) is not a file"
