"""fastmim.testing's subprocess runner: no wall-clock limit, but a hung process is ended."""

import sys
import time

import pytest

from fastmim.testing import run_until_stalled


def test_a_slow_busy_process_runs_to_the_end_and_its_output_is_returned():
    # CPU-bound for longer than the stall limit: never cut short.
    script = "import sys; print('out'); [sum(range(10**6)) for _ in range(60)]; print('err', file=sys.stderr)"
    proc = run_until_stalled([sys.executable, "-c", script], stall_seconds=2)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "out\n", "err\n")


def test_a_hung_process_tree_is_killed_with_an_error():
    # A child that waits forever without output or CPU time, behind a parent that waits on it.
    script = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(600)'])"
    start = time.monotonic()
    with pytest.raises(AssertionError, match="made no progress"):
        run_until_stalled([sys.executable, "-c", script], stall_seconds=2)
    assert time.monotonic() - start < 300  # ended long before the child's sleep would be
