"""The single-process backend: one model on one device, DCP checkpoints in the same format as FSDP's."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from hfdist import checkpoint
from hfdist.distributed.base import Backend, StepResult
from hfdist.distributed.parallelize import (
    apply_compile,
    enable_activation_checkpointing,
)
from hfdist.export import module_tensors


class SingleBackend(Backend):
    name = "single"

    def __init__(self, config, device: torch.device | None = None):
        super().__init__(config)
        if device is None:
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
        self.device = device

    def build(
        self, model_factory: Callable[[torch.device], nn.Module], optimizer_factory, scheduler_factory
    ) -> None:
        self.model = model_factory(self.device)
        if self.config.train.activation_checkpointing:
            enable_activation_checkpointing(self.model.lm)
        if self.config.train.compile:
            apply_compile(self.model.lm)
        self.optimizer = optimizer_factory(self.model)
        self.scheduler = scheduler_factory(self.optimizer)

    def backward(self, loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        loss.backward()

    def step(self, max_grad_norm: float, readout: Optional[torch.Tensor] = None) -> StepResult:
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
        return self._finish_step(params, grad_norm, max_grad_norm, readout)

    def _state(self) -> dict:
        return checkpoint.trained_state(self.model, self.optimizer)

    def save_checkpoint(self, folder: Path, async_: bool = False, on_written=None):

        scheduler: dict = {}
        checkpoint.write_file(
            folder, "scheduler.pt", checkpoint.torch_bytes(self.scheduler.state_dict()), scheduler, 0
        )
        written = checkpoint.save_dcp(
            self._state(), folder, 0, async_=async_, no_dist=True, on_written=on_written
        )
        return checkpoint.merged(written, scheduler)

    def load_checkpoint(self, folder: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder / "dcp"), no_dist=True)
        checkpoint.load_trained_state(self.model, self.optimizer, state)
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    def export_tensors(self) -> list:

        return module_tensors(self.model.lm)
