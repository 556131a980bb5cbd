"""The FSDP2 backend: ``fully_shard`` per decoder layer plus the root, meta-device init, DCP checkpoints.

Build order (torchtitan's): the model is created on the meta device (no memory), activation checkpointing
is switched on, ``apply_fsdp`` shards it over the device mesh, ``to_empty`` allocates only this rank's
shards, and the weights are filled shard by shard (see loading.py). Gradients: FSDP2 averages them over
the data-parallel ranks, while the loop hands each rank ``local loss sum / global tokens``; ``backward``
multiplies by the data-parallel size so that the reduced gradient is exactly that of the global mean.
Checkpoints use the same DCP layout as the single backend (``dcp/`` with ``model`` and ``optimizer``
entries, ``scheduler.pt``), so one written by N ranks loads on M ranks, or on the single backend.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from hfdist.distributed import loading
from hfdist.distributed.base import Backend, StepResult
from hfdist.distributed.env import LaunchEnv
from hfdist.distributed.parallelize import apply_compile, apply_fsdp, build_mesh, enable_activation_checkpointing
from hfdist.distributed.watchdog import set_group_timeouts
from hfdist.errors import HfdistError

logger = logging.getLogger(__name__)


class FSDPBackend(Backend):
    name = "fsdp"

    def __init__(self, config, env: LaunchEnv):
        super().__init__(config)
        self.join_process_group(env)
        self.mesh = build_mesh(self.device.type, self.world_size, config.distributed.replicate_degree)
        # HSDP's subgroups would otherwise wait torch's default 10/30 minutes instead of distributed.timeout_s.
        set_group_timeouts([self.mesh.get_group(name) for name in self.mesh.mesh_dim_names],
                           config.distributed.timeout_s)
        self._root_gathered = False

    # ---- model -------------------------------------------------------------------------------------
    def build(self, model_factory: Callable[[torch.device], nn.Module], optimizer_factory, scheduler_factory) -> None:
        dcfg = self.config.distributed
        started = time.perf_counter()
        model = model_factory(torch.device("meta"))
        if self.config.train.activation_checkpointing:
            enable_activation_checkpointing(model.lm)
        if self.config.train.compile:
            apply_compile(model.lm)
        apply_fsdp(model, self.mesh, mixed_precision=dcfg.mixed_precision, cpu_offload=dcfg.cpu_offload)
        # Sharded parameters live on the host under CPU offload; buffers are used by the compute device.
        model.to_empty(device="cpu" if dcfg.cpu_offload else self.device)
        self._fill_weights(model)
        loading.init_non_persistent_buffers(model.lm)
        if dcfg.cpu_offload:
            for module in model.modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[name] = buffer.to(self.device)
        # Make the HyperfitModel the FSDP root now: evaluation calls the inner Hugging Face model directly,
        # and FSDP2 would otherwise take the first decoder layer it runs as the root.
        model._get_fsdp_state()._lazy_init()
        model.lm.register_forward_pre_hook(self._gather_root, with_kwargs=True)
        self.model = model
        self.optimizer = optimizer_factory(model)
        self.scheduler = scheduler_factory(self.optimizer)
        self.params_per_rank = sum(p.to_local().numel() for p in model.parameters() if isinstance(p, DTensor))
        logger.info("fsdp: %d ranks (mesh %s), %.3f B parameters per rank, built in %.1f s", self.world_size,
                    dict(zip(self.mesh.mesh_dim_names, self.mesh.shape)), self.params_per_rank / 1e9,
                    time.perf_counter() - started)

    def _fill_weights(self, model: nn.Module) -> None:
        mcfg = self.config.model
        if mcfg.init == "random":
            loading.init_random(model.lm)
            return
        files = None
        if self.config.distributed.weight_loading == "per_rank" and not mcfg.gguf_file:
            folder = self._local_model_folder()
            files = loading.safetensors_files(folder) if folder is not None else None
        if files is not None:
            loading.load_sharded_safetensors(model, files)
            return
        if self.config.distributed.weight_loading == "per_rank":
            logger.warning("fsdp: %s has no safetensors weights to read per rank: falling back to loading the "
                           "whole model on rank 0 and broadcasting its shards", mcfg.path)
        from hfdist.models import load_model

        full = load_model(mcfg, torch.device("cpu")).state_dict() if self.is_main else {}
        loading.load_full_from_rank0(model, full)

    def _local_model_folder(self) -> Path | None:
        """The model's folder on this host; a hub id is fetched (safetensors and JSON only) once per node."""
        from hfdist.models import resolve_model_path

        path = resolve_model_path(self.config.model.path)
        if Path(path).is_dir():
            return Path(path)
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            return None
        patterns = ["*.safetensors", "*.json"]
        folder = None
        if self.env.local_rank == 0:
            folder = snapshot_download(path, revision=self.config.model.revision, allow_patterns=patterns)
        self.barrier()
        if folder is None:
            folder = snapshot_download(path, revision=self.config.model.revision, allow_patterns=patterns)
        return Path(folder)

    def uses_host_collectives(self) -> bool:
        # CPU offload keeps the reduced gradients on the host: the clipping norm all-reduces host tensors.
        return self.config.distributed.cpu_offload

    def optimizer_on_host(self) -> bool:
        return self.config.distributed.cpu_offload

    # ---- training ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        self._root_gathered = False  # the root's forward has gathered it; backward reshards it
        (loss * self.dp_size).backward()

    def step(self, max_grad_norm: float, readout: Optional[torch.Tensor] = None) -> StepResult:
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        total_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(total_norm, DTensor):
            # The partial norms of all shards, reduced: the same on every rank. Under CPU offload the gradients and
            # so this norm live on the host: the group has a gloo backend for it (env.process_group_backend).
            total_norm = total_norm.full_tensor()
        return self._finish_step(params, total_norm, max_grad_norm, readout)

    # ---- collectives -------------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    # ---- state ---------------------------------------------------------------------------------------
    def _reshard_root(self) -> None:
        if self._root_gathered:
            self.model.reshard()
            self._root_gathered = False

    def _state(self) -> dict:
        self._reshard_root()
        options = StateDictOptions(full_state_dict=False)
        return {"model": get_model_state_dict(self.model, options=options),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options)}

    def save_checkpoint(self, folder: Path, step: int = 0, async_: bool = False):
        from hfdist import checkpoint

        small: dict = {}
        if self.is_main:
            checkpoint.write_file(folder, "scheduler.pt", checkpoint.torch_bytes(self.scheduler.state_dict()), small, 0)
            topology = {"backend": self.name, "world_size": self.world_size, "params_per_rank0": self.params_per_rank,
                        "mesh": dict(zip(self.mesh.mesh_dim_names, self.mesh.shape))}
            checkpoint.write_file(folder, "topology.json", (json.dumps(topology) + "\n").encode(), small, 0)
        written = checkpoint.save_dcp(self._state(), folder, self.rank, step=step, async_=async_,
                                      process_group=self.checkpoint_group if async_ else None)
        return checkpoint.merged(written, small)

    def load_checkpoint(self, folder: Path) -> None:
        if not (folder / "dcp").is_dir():
            raise HfdistError(f"--resume {folder}: not a DCP checkpoint (written by the deepspeed backend? "
                              "resume it with distributed.backend=deepspeed)")
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder / "dcp"))  # reshards when the world size differs
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    def export_tensors(self) -> list:
        """Every rank's own pieces of the sharded parameters (any mesh: the DTensor placements say where each piece
        lies), none gathered; buffers (not sharded) are written by rank 0."""
        from hfdist.export import module_tensors

        self._reshard_root()  # evaluation leaves the root's parameters gathered: back to the sharded DTensors
        return module_tensors(self.model.lm)

    def _gather_root(self, module: nn.Module, args, kwargs) -> None:
        # Calling the inner model (evaluation, generation: all ranks together) bypasses the root's hooks:
        # gather the root's own parameters (final norm, LM head) first; the decoder layers gather
        # themselves. The next backward or checkpoint reshards them.
        if not self._root_gathered:
            self.model.unshard()
            self._root_gathered = True

    def unwrapped_lm(self) -> nn.Module:
        return self.model.lm

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
