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


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` of the model a command loads (``hfdist.models``)."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def add_decoding_arguments(parser: argparse.ArgumentParser, *, top_p=None, top_k=None, seed_help="") -> None:
    """The decoding flags ``generate`` and ``compare`` share, named as ``DecodeOptions`` fields: tokens per
    continuation, top-p and top-k (their defaults the command's), the seed, the citation blocker's n-gram length, the
    batch size; then ``add_device_arguments``."""
    parser.add_argument(
        "--max-new-tokens", type=int, default=224, help="tokens per continuation (default: 224)"
    )
    parser.add_argument("--top-p", type=float, default=top_p)
    parser.add_argument("--top-k", type=int, default=top_k, help="0 disables")
    parser.add_argument("--seed", type=int, default=0, help=f"sampling seed{seed_help} (default: 0)")
    parser.add_argument(
        "--blocker-n", type=int, default=5, help="citation blocker n-gram length (default: 5)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="contexts decoded at once (default: 32)")
    add_device_arguments(parser)


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """One line naming the flag for each of ``names`` (argparse dests) given below 1; ``None`` (unset) passes."""
    from hfdist.errors import HfdistError

    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HfdistError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")


def dataclass_from_args(cls, args: argparse.Namespace, **fields):
    """``cls(...)`` from the parsed flags named as its fields (those given, i.e. not ``None``), then ``fields``: the
    dataclass checks its values, the command does not repeat the checks."""
    import dataclasses

    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
    return cls(**{**values, **fields})
