"""The interface every backend (single, fsdp, deepspeed) gives the training loop.

The loop never asks which backend it runs on. A backend owns: the process group, how the model is built
(meta device, zero.Init, or plainly), how it and the optimizer are wrapped, how gradients are reduced and
scaled, and how training state is saved and exported.

Loss convention: the loop hands ``backward`` this rank's share of the global loss, that is
``sum(token losses on this rank's micro-batch) / (non-ignored tokens in the whole global batch, all ranks)``.
The true loss of the step is the sum of these shares over ranks and micro-batches; each backend scales
for its own reduction (FSDP and DeepSpeed average gradients across ranks, so they multiply by the
data-parallel size) so that the gradient is exactly that of the global mean.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from hfdist.config import Config
from hfdist.distributed.env import host_threads, init_process_group
from hfdist.distributed.layout import accumulation_steps
from hfdist.watchdog import monitored_barrier

logger = logging.getLogger(__name__)


class StepResult(NamedTuple):
    grad_norm: float  # the global L2 norm of the gradient before clipping (inf/NaN when not finite)
    values: list[float]  # the step's ``readout`` values (loss, entropy), on the host
    applied: (
        bool  # False: a non-finite loss or gradient norm; neither the optimizer nor the LR scheduler stepped
    )


class Backend(ABC):
    name: str = "base"

    def __init__(self, config: Config):
        self.config = config
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.device = torch.device("cpu")
        self.model: Optional[nn.Module] = None  # the HyperfitModel, wrapped as the backend needs
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self.checkpoint_group = (
            None  # a gloo group of its own for asynchronous checkpoints (checkpoint.async)
        )
        self.pending_checkpoint = None  # the asynchronous checkpoint being written (hfdist.checkpoint)

    def join_process_group(self, env) -> None:
        """Start (or join) the launcher's process group and take this rank's place in it (FSDP, DeepSpeed).

        The group starts under ``distributed.startup_timeout_s`` (the trainer switches to ``timeout_s`` for
        training); on CUDA it also gets a gloo backend for host tensors when ``uses_host_collectives()``."""

        dcfg = self.config.distributed
        self.env = env
        self.device = init_process_group(
            env, dcfg.startup_timeout_s, host_collectives=self.uses_host_collectives()
        )
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        if self.config.checkpoint.async_:
            # The background writer's collectives (DCP's plan and metadata exchange) must not interleave with the
            # training loop's on the default group; a gloo group also gives the CPU staging its CPU backend.
            self.checkpoint_group = dist.new_group(
                backend="gloo", timeout=timedelta(seconds=dcfg.checkpoint_timeout_s)
            )
        self.apply_host_threads()

    def uses_host_collectives(self) -> bool:
        """Whether collectives run on host tensors (then NCCL needs gloo beside it)."""
        return False

    def optimizer_on_host(self) -> bool:
        """Whether the optimizer steps on the host while the model computes on the device."""
        return False

    def apply_host_threads(self) -> None:
        """Give a host-side optimizer the cores of this rank's share of the node (see env.host_threads)."""

        threads = host_threads(
            self.device.type,
            self.optimizer_on_host(),
            getattr(self.env, "local_world_size", 1),
            self.config.distributed.host_threads,
        )
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            logger.info(
                "optimizer on the host: %d threads per rank (distributed.host_threads; "
                "0 = cores / ranks on the node)",
                threads,
            )

    # ---- topology -------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

    def gradient_accumulation_steps(self) -> int:
        """global batch = micro batch x accumulation x data-parallel size; refuse what does not divide."""
        return accumulation_steps(self.config, self.dp_size)

    # ---- model ------------------------------------------------------------------------------------
    @abstractmethod
    def build(
        self,
        model_factory: Callable[[torch.device], nn.Module],
        optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
        scheduler_factory: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
    ) -> None:
        """Build the HyperfitModel (``model_factory(device)``; device may be ``meta``), wrap it, build the
        optimizer and scheduler over the wrapped parameters. Sets self.model/optimizer/scheduler."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        """Backpropagate this rank's share of the global loss (see the module docstring)."""

    @abstractmethod
    def step(self, max_grad_norm: float, readout: Optional[torch.Tensor] = None) -> StepResult:
        """Clip (when max_grad_norm > 0), step the optimizer and scheduler, zero the gradients, unless the
        gradient norm or a ``readout`` value (the step's all-reduced loss and entropy) is NaN/inf: then the
        gradients are zeroed and nothing else happens. The decision rests on global values only, so every rank
        takes the same one. The norm and ``readout`` come to the host together: the step's one host sync."""

    def _finish_step(
        self, params: list, grad_norm: torch.Tensor, max_grad_norm: float, readout: Optional[torch.Tensor]
    ) -> StepResult:
        """The single/FSDP step after the global norm is known: check, clip, step (or skip), zero the grads."""
        values = grad_norm.detach().reshape(1).float()
        if readout is not None:
            values = torch.cat([values, readout.detach().reshape(-1).float().to(values.device)])
        host = (
            values.tolist()
        )  # the one host sync of a step: skipping a bad step needs its values on the host
        applied = all(math.isfinite(v) for v in host)
        if applied:
            if max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_norm, foreach=True)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(host[0], host[1:], applied)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- collectives --------------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_step_totals(self, shared: torch.Tensor, requests: torch.Tensor) -> torch.Tensor:
        """The step's one collective (``hfdist.trainer.train_step``): ``shared`` (this data-parallel rank's share of
        the step's loss and entropy, alike on the ranks of a tensor-parallel group) summed over the data-parallel
        ranks, and ``requests`` (per-rank flags: a preemption signal) summed over every rank of the job; returned
        concatenated. Here the data-parallel ranks are all the ranks."""
        return self.all_reduce_sum(torch.cat([shared, requests]))

    def barrier(self) -> None:
        pass

    def monitored_barrier(self) -> None:
        """A barrier that, on gloo, names the ranks that did not arrive within ``distributed.timeout_s``."""

        monitored_barrier(self.config.distributed.timeout_s)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable; the process group's own serialisation)."""

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list:

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [obj]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    # ---- state ---------------------------------------------------------------------------------------
    @abstractmethod
    def save_checkpoint(
        self, folder: Path, async_: bool = False, on_written: Optional[Callable[[], None]] = None
    ):
        """Write model, optimizer and scheduler state into ``folder`` (all ranks call; the folder is temporary and
        made atomic by hfdist.checkpoint). Returns a ``concurrent.futures.Future`` of the records (size, checksum,
        rank) of the files this rank wrote, done once they are written; with ``async_`` the state is copied and
        written in the background. ``on_written`` is called once this rank's data files are written."""

    @abstractmethod
    def load_checkpoint(self, folder: Path) -> None:
        """Load what save_checkpoint wrote (possibly at another world size, where the backend allows)."""

    @abstractmethod
    def export_tensors(self) -> list:
        """The tensors of the Hugging Face checkpoint (``hfdist.export.ExportTensor``: names as in
        ``model.lm.state_dict()``, a tied weight once, global shapes; the same list on every rank), each with the
        pieces this rank writes. All ranks call it; nothing is gathered."""

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole value of a small parameter (an adapter's) on every rank; all ranks call, in the same order."""
        return tensor.detach()

    def unwrapped_lm(self) -> nn.Module:
        """The Hugging Face model inside, for evaluation and generation (sharded under FSDP: all ranks
        must run its forward passes together)."""
        return self.model.lm

    def close(self) -> None:
        pass
