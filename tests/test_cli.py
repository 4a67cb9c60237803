"""The fastmim command: info, usage errors (exit 2, no traceback), python -m entry point."""

import subprocess
import sys

import pytest

from fastmim.cli import main


def test_info_prints_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("fastmim", "torch", "triton", "timm", "xformers", "reference", "backends on cpu"):
        assert word in out


@pytest.mark.parametrize("argv", [["no-such-command"], ["info", "--no-such-option"], []])
def test_bad_usage_exits_2_with_usage_and_no_traceback(argv):
    proc = subprocess.run([sys.executable, "-m", "fastmim", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage: fastmim" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("entry", [["-m", "fastmim"], ["-m", "fastmim.cli"]])
def test_both_module_entry_points_run_subcommands_with_one_line_errors(entry):
    # A late error (CLIError raised inside the train subcommand) must be caught by the entry
    # point's main as one line, whichever module was run.
    proc = subprocess.run([sys.executable, *entry, "train", "--max-steps", "0"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "fastmim: error: --max-steps must be positive, got 0"
    for command in ("train", "eval", "info"):
        proc = subprocess.run([sys.executable, *entry, command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and f"usage: fastmim {command}" in proc.stdout, proc.stderr
