"""Backends behind one interface (see base.py). The DISTRIBUTED worker extends build_backend."""
from __future__ import annotations

from hfdist.config import Config
from hfdist.distributed.base import Backend
from hfdist.errors import HfdistError


def build_backend(config: Config) -> Backend:
    if config.distributed.backend == "single":
        from hfdist.distributed.single import SingleBackend

        return SingleBackend(config)
    raise HfdistError(f"config field distributed.backend: {config.distributed.backend!r} is not available yet")
