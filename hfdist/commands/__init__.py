"""The CLI's commands, one module each (``add_parser`` and ``run``); shared argument definitions here."""

from __future__ import annotations

import argparse


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION.FIELD=VALUE`` (repeatable), read by ``hfdist.config.load_config`` as ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field; repeatable (e.g. --set optim.lr=1e-5)",
    )
