"""Backends behind one interface (base.py): single process, FSDP2, DeepSpeed ZeRO-3.

``build_backend`` reads where this process sits in the job (torchrun, SLURM, mpirun or nothing: see
env.py), starts the process group for the sharded backends, and returns the backend the config names.
"""
from __future__ import annotations

from hfdist.config import Config
from hfdist.distributed.base import Backend
from hfdist.distributed.env import LaunchEnv, discover
from hfdist.distributed.layout import launch_layout
from hfdist.errors import HfdistError

__all__ = ["Backend", "LaunchEnv", "build_backend", "discover"]


def build_backend(config: Config) -> Backend:
    env = discover()
    name = config.distributed.backend
    # Refused before the process group waits for peers, by the same check `hfdist plan` runs.
    layout = launch_layout(config, env.world_size, env.local_world_size)
    if name == "single":
        from hfdist.distributed.single import SingleBackend

        return SingleBackend(config)
    if name == "fsdp":
        from hfdist.distributed.fsdp import FSDPBackend

        return FSDPBackend(config, env, layout)
    if name == "deepspeed":
        from hfdist.distributed.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(config, env)
    raise HfdistError(f"config field distributed.backend: {name!r} is not one of single, fsdp, deepspeed")
