"""The ``hfdist`` command: parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from hfdist import __version__
from hfdist.errors import HfdistError
from hfdist.preemption import Preempted

COMMANDS = ["hyperfit", "generate", "evaluate", "compare", "plan", "bench"]


class Parser(argparse.ArgumentParser):
    """argparse with hfdist's error format: one line naming the argument, exit status 2 (no usage block)."""

    def error(self, message: str):
        command = self.prog.removeprefix("hfdist").strip()
        self.exit(2, f"hfdist: error: {command + ': ' if command else ''}{message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hfdist",
        description="Hyperfit causal language models (fine-tune to near-zero loss on a tiny set, then decode "
        "greedily) and measure the paper's effects: hyperfit, generate, evaluate, compare, plan, bench.",
    )
    parser.add_argument("--version", action="version", version=f"hfdist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hfdist.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"hfdist.commands.{name}":
                raise
            continue  # a command whose module is not part of this build
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun, srun or mpirun only rank 0 logs at INFO (the launcher's variable names differ).
    rank = next(
        (
            int(os.environ[k])
            for k in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
            if os.environ.get(k, "").isdigit()
        ),
        0,
    )
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "torch.distributed", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HfdistError as exc:
        if args.debug:
            raise
        print(f"hfdist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Preempted as exc:  # the checkpoint is written and the trainer has said so
        return exc.exit_code
    except KeyboardInterrupt:
        print("hfdist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
