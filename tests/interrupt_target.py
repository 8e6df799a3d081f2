"""Run by tests/test_suite_bounds.py in a pytest of its own (`pytest -n 2 tests/interrupt_target.py`), never collected
by the suite (not a test_*.py file): one test that starts, through tests/_proc.py, LAUNCHER, whose worker sits in a
session of its own (as torch elastic starts workers); the launcher writes its pid and the worker's to the file named
by INTERRUPT_TARGET_PID_FILE and waits. The caller then sends SIGTERM to that pytest and checks that the worker is
gone. test_suite_bounds' timeout check starts the same LAUNCHER directly."""

import os
import sys

import _proc

# argv[1]: the file it writes "LAUNCHER_PID WORKER_PID" to
LAUNCHER = ("import os, subprocess, sys, time\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
            "open(sys.argv[1], 'w').write(f'{os.getpid()} {w.pid}')\n"
            "time.sleep(300)\n")


def test_waits_on_a_launcher_with_a_worker_in_its_own_session():
    _proc.run([sys.executable, "-c", LAUNCHER, os.environ["INTERRUPT_TARGET_PID_FILE"]], timeout=300)
