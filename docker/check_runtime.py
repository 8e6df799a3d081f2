"""Fail unless this Python environment has exactly the FlexAI runtime's versions.

Run by docker/Dockerfile after the requirements are installed, so an image whose base drifted (or whose
pip resolve replaced torch) fails to build instead of testing a stack FlexAI never runs:

    python3 docker/check_runtime.py --python 3.12 torch==2.8.0 vllm==0.11.0

A distribution version matches when it is equal up to a local suffix (torch `2.8.0+cu128` is 2.8.0).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata


def mismatches(pins: list[str], python: str | None) -> list[str]:
    """Return one message per pin (`name==version`) or Python `major.minor` the environment does not match."""
    problems = []
    if python is not None:
        running = f"{sys.version_info.major}.{sys.version_info.minor}"
        if running != python:
            problems.append(f"python {running} != {python}")
    for pin in pins:
        name, sep, wanted = pin.partition("==")
        if not sep or not name or not wanted:
            problems.append(f"{pin!r} is not of the form name==version")
            continue
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed (want {wanted})")
            continue
        if found.split("+", 1)[0] != wanted:
            problems.append(f"{name} {found} != {wanted}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pins", nargs="*", help="name==version, e.g. torch==2.8.0")
    parser.add_argument("--python", help="expected major.minor, e.g. 3.12")
    args = parser.parse_args(argv)
    problems = mismatches(args.pins, args.python)
    for problem in problems:
        print(f"runtime mismatch: {problem}", file=sys.stderr)
    if not problems:
        print("runtime ok: " + " ".join([f"python=={args.python}"] * bool(args.python) + args.pins))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
