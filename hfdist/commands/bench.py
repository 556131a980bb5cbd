"""``hfdist bench train|generate|kernels|all``: run the benchmark scripts in ``benchmarks/``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SCRIPTS = {
    "train": ["bench_train.py"],
    "generate": ["bench_generate.py"],
    "kernels": ["bench_cross_entropy.py", "bench_sampling.py"],
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput and memory against reference implementations",
        description="Run a benchmark from benchmarks/ (baseline and hfdist in the same process tree, same "
        "machine, model and settings); results go to benchmarks/results/ as JSON and markdown. "
        "Arguments after the benchmark name go to its script (see `hfdist bench train -- --help`).",
    )
    parser.add_argument("what", choices=[*SCRIPTS, "all"], help="which benchmark")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    parser.set_defaults(func=run)
    return parser


def benchmarks_dir() -> Path:
    from hfdist.errors import HfdistError

    for candidate in (Path(__file__).resolve().parents[2] / "benchmarks", Path.cwd() / "benchmarks"):
        if (candidate / "bench_train.py").is_file():
            return candidate
    raise HfdistError(
        "hfdist bench: the benchmarks/ folder of a source checkout is needed (run from the repository)"
    )


def run(args) -> int:
    folder = benchmarks_dir()
    extra = [a for a in args.script_args if a != "--"]
    names = [n for what in SCRIPTS for n in SCRIPTS[what]] if args.what == "all" else SCRIPTS[args.what]
    for name in names:
        code = subprocess.run([sys.executable, str(folder / name), *extra]).returncode
        if code:
            return code
    return 0
