"""The command line: help for every subcommand, one-line errors with a non-zero exit and no traceback."""
import subprocess
import sys

import pytest

from hfdist.cli import build_parser


def _hfdist(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hfdist.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


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


@pytest.mark.parametrize("args, message", [
    (["hyperfit", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["hyperfit", "--set", "train.epochs=-1"], "config field train.epochs: must be > 0, got -1"),
    (["hyperfit", "--set", "model.path=./no/such/model", "--output-dir", "OUT"], "model.path './no/such/model': no such file or folder"),
    (["hyperfit", "--resume"], "--resume needs --output-dir (the run folder to continue)"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "run")) for a in args]
    result = _hfdist(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hfdist: error:")]
    assert lines == [f"hfdist: error: {message}"], result.stderr
    assert "Traceback" not in result.stderr
