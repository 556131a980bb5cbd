"""The command line: help for every subcommand (bad input, one-line errors: tests/test_reliability_inputs.py)."""

import subprocess
import sys

from hfdist.cli import build_parser


def _hfdist(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "hfdist.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_every_subcommand_has_help():
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert "hyperfit" in subcommands
    for name, sub in subcommands.items():
        text = sub.format_help()
        assert sub.description or sub.format_usage(), name
        assert "usage: hfdist " + name in text


def test_top_level_help_lists_commands():
    result = _hfdist("--help")
    assert result.returncode == 0 and "hyperfit" in result.stdout
