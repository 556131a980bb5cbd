"""Where this process sits in the job: rank, world size, local rank and the rendezvous address.

Launchers announce the topology differently; each is read here into one ``LaunchEnv``:
- ``torchrun`` (also ``srun torchrun`` and the ``deepspeed`` launcher): RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
- SLURM with one task per GPU (``srun python -m hfdist ...``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
  SLURM_NTASKS_PER_NODE; the master is the first host of SLURM_JOB_NODELIST, the port derives from the job id.
- MPI (``mpirun``/``mpiexec`` from MPICH or OpenMPI): rank and size from mpi4py's COMM_WORLD, the local rank
  from a shared-memory split of it, the master address (rank 0's host name) and a free port broadcast from
  rank 0.
The result is written back as the torchrun variables so that ``init_method="env://"`` and DeepSpeed read
the same values whichever launcher started the job.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hfdist.errors import HfdistError
from hfdist.watchdog import watchdog

logger = logging.getLogger(__name__)

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


@dataclass
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # torchrun, slurm, mpi or none

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def export(self) -> None:
        """Set the torchrun variables (env:// rendezvous, DeepSpeed and transformers read them)."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int_env(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise HfdistError(f"environment variable {name}: missing (set by the launcher)")
        return default
    try:
        return int(value)
    except ValueError:
        raise HfdistError(f"environment variable {name}: expected an integer, got {value!r}") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,09],cpu1`` -> ``gpu03`` (as ``scontrol show hostnames``)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise HfdistError(f"environment variable SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def _slurm_tasks_per_node() -> int:
    # SLURM_NTASKS_PER_NODE is only set with --ntasks-per-node; SLURM_TASKS_PER_NODE is "4(x2),3" style.
    if "SLURM_NTASKS_PER_NODE" in os.environ:
        return _int_env("SLURM_NTASKS_PER_NODE")
    text = os.environ.get("SLURM_TASKS_PER_NODE", "1")
    return int(re.match(r"\d+", text).group(0))


def _from_torchrun() -> LaunchEnv:
    world_size = _int_env("WORLD_SIZE")
    return LaunchEnv(
        rank=_int_env("RANK"),
        world_size=world_size,
        local_rank=_int_env("LOCAL_RANK", 0),
        local_world_size=_int_env("LOCAL_WORLD_SIZE", world_size),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int_env("MASTER_PORT", 29500),
        launcher="torchrun",
    )


def _from_slurm() -> LaunchEnv:
    job_id = _int_env("SLURM_JOB_ID", 0)
    return LaunchEnv(
        rank=_int_env("SLURM_PROCID"),
        world_size=_int_env("SLURM_NTASKS"),
        local_rank=_int_env("SLURM_LOCALID", 0),
        local_world_size=_slurm_tasks_per_node(),
        master_addr=os.environ.get("MASTER_ADDR") or first_slurm_host(os.environ["SLURM_JOB_NODELIST"]),
        # One port per job, so that two jobs sharing a node do not collide.
        master_port=_int_env("MASTER_PORT", 20000 + job_id % 20000),
        launcher="slurm",
    )


def _from_mpi() -> LaunchEnv:
    try:
        from mpi4py import MPI  # noqa: PLC0415 (optional: the mpi extra)
    except ImportError:
        raise HfdistError(
            "launched by mpirun, but mpi4py is not installed (pip install hfdist[mpi])"
        ) from None
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)  # the ranks on this host
    local_rank, local_world_size = local.Get_rank(), local.Get_size()
    local.Free()
    if rank == 0:
        # A host name every rank can resolve; MASTER_ADDR/MASTER_PORT given by the user take precedence.
        master = (
            os.environ.get("MASTER_ADDR") or socket.gethostname(),
            int(os.environ.get("MASTER_PORT") or free_port()),
        )
    else:
        master = None
    master_addr, master_port = comm.bcast(master, root=0)
    return LaunchEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=master_addr,
        master_port=master_port,
        launcher="mpi",
    )


def discover() -> LaunchEnv:
    """Read the topology from whichever launcher started this process (see the module docstring)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _from_torchrun()
    if (
        "SLURM_PROCID" in os.environ
        and _int_env("SLURM_NTASKS", 1) > 1
        and "SLURM_JOB_NODELIST" in os.environ
    ):
        return _from_slurm()
    if any(name in os.environ for name in MPI_RANK_VARS):
        return _from_mpi()
    return LaunchEnv()


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this job's workers; 0 outside torchrun."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def slurm_job_id() -> str | None:
    """The SLURM job this process belongs to (the same id across requeues), or None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_count() -> int:
    """How many times SLURM has requeued this job (``scontrol requeue``, preemption); 0 on its first start."""
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def restart_store(env: LaunchEnv, timeout_s: int):
    """On a torchrun restart whose workers share the agent's store: that store, under a prefix of this attempt.

    torchrun's c10d rendezvous lets workers use the agent's TCPStore, which outlives a restart: the keys of
    the failed attempt (gloo addresses, NCCL ids) are still there, and the restarted ranks read them and
    connect to dead peers (pytorch/pytorch#135712). On one node every worker of an attempt has the same restart
    count, so a per-attempt prefix separates the attempts. Across nodes the agents' counts can differ: there
    the fix is ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in the launcher's environment (launchers/torchrun.sh
    sets it), which gives each attempt a store of its own; this function then returns None.
    """
    attempt = restart_count()
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    nodes = _int_env("GROUP_WORLD_SIZE", 1)
    if nodes != 1:
        raise HfdistError(
            f"torchrun restart {attempt} on {nodes} nodes with the rendezvous store shared across "
            "attempts (stale keys of the failed attempt, pytorch/pytorch#135712): launch with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set for torchrun (launchers/torchrun.sh does)"
        )

    client = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"hfdist/restart_{attempt}", client)


def process_group_backend(device_type: str, host_collectives: bool) -> str:
    """The backend string of the default process group: gloo on a CPU; NCCL on CUDA, with gloo beside it for CPU
    tensors (``cuda:nccl,cpu:gloo``, as torchtitan does) when collectives run on host tensors: under FSDP's CPU
    offload the parameters and gradients live on the host, and DTensor and DCP run their collectives on them there
    (the clipping norm itself is all-reduced on the device: fsdp.global_grad_norm). Without the CPU backend such a
    collective fails with "No backend type associated with device type cpu"."""
    if device_type == "cuda":
        return "cuda:nccl,cpu:gloo" if host_collectives else "nccl"
    return "gloo"


def host_threads(
    device_type: str,
    optimizer_on_host: bool,
    local_world_size: int,
    requested: int = 0,
    cpus: int | None = None,
) -> int | None:
    """Threads for an optimizer that steps on the host while the model computes on CUDA (FSDP cpu_offload, DeepSpeed
    offload_optimizer): ``requested`` (distributed.host_threads) or, when 0, the cores this process may run on
    divided by the ranks of its node (at least 1). None: leave torch's setting alone (the launchers' OMP_NUM_THREADS=1
    suits ranks that share a CPU-only node, and GPU ranks whose optimizer runs on the device)."""
    if device_type != "cuda" or not optimizer_on_host:
        return None
    if requested:
        return requested
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, local_world_size))


def init_process_group(
    env: LaunchEnv,
    timeout_s: int,
    host_collectives: bool = False,
    timeout_field: str = "distributed.startup_timeout_s",
) -> torch.device:
    """Start the default process group (see ``process_group_backend``); returns this rank's device.

    ``timeout_s`` (the start-up timeout) bounds the rendezvous (every rank must join within it) and every collective
    until the trainer switches the group to ``distributed.timeout_s`` for training: gloo raises in the waiting rank,
    NCCL's watchdog aborts the collective (see docs/reliability.md for the TORCH_NCCL_* variables). The
    watchdog then records each rank's progress for naming a hung rank."""

    if torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise HfdistError(
                f"local rank {env.local_rank} but only {torch.cuda.device_count()} CUDA devices on "
                f"{socket.gethostname()}: launch at most one process per GPU"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = process_group_backend(device.type, host_collectives)
    watchdog.timeout_field = timeout_field
    if dist.is_initialized():
        watchdog.attach(timeout_s)
        return device
    if env.launcher == "none" and "MASTER_PORT" not in os.environ:
        env.master_port = free_port()  # a one-process group (e.g. FSDP on one rank) needs some port
    env.export()
    logger.info(
        "process group: %s, rank %d of %d (local %d of %d), rendezvous %s:%d via %s",
        backend,
        env.rank,
        env.world_size,
        env.local_rank,
        env.local_world_size,
        env.master_addr,
        env.master_port,
        env.launcher,
    )
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    store = restart_store(env, timeout_s)
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = "env://"
    try:
        dist.init_process_group(
            backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s), **kwargs
        )
    except (RuntimeError, ValueError) as exc:
        raise HfdistError(
            f"process group: cannot rendezvous at {env.master_addr}:{env.master_port} as rank "
            f"{env.rank} of {env.world_size} within {timeout_field}={timeout_s} "
            f"({str(exc).splitlines()[0]})"
        ) from None
    watchdog.attach(timeout_s)
    return device
