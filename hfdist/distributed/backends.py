"""``build_backend``: the backend a config names, in the process group of the launcher that started this process.

It reads where this process sits in the job (torchrun, SLURM, mpirun or nothing: see env.py), checks the layout
(the same check ``hfdist plan`` runs, before any process waits for its peers), starts the process group for the
sharded backends, and returns the backend: single process, FSDP2 (optionally with tensor parallelism) or
DeepSpeed ZeRO-3.
"""

from __future__ import annotations

from hfdist.config import Config
from hfdist.distributed.base import Backend
from hfdist.distributed.env import discover
from hfdist.distributed.fsdp import FSDPBackend
from hfdist.distributed.layout import launch_layout
from hfdist.distributed.single import SingleBackend
from hfdist.errors import HfdistError


def build_backend(config: Config) -> Backend:
    env = discover()
    name = config.distributed.backend
    layout = launch_layout(config, env.world_size, env.local_world_size)
    if name == "single":
        return SingleBackend(config)
    if name == "fsdp":
        return FSDPBackend(config, env, layout)
    if name == "deepspeed":
        from hfdist.distributed.deepspeed import DeepSpeedBackend  # noqa: PLC0415 (optional: the deepspeed extra)

        return DeepSpeedBackend(config, env)
    raise HfdistError(f"config field distributed.backend: {name!r} is not one of single, fsdp, deepspeed")
