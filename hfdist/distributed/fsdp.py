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
from huggingface_hub import snapshot_download
from torch import nn
from torch.distributed.tensor import DTensor

from hfdist import adapters, checkpoint
from hfdist.distributed import loading
from hfdist.distributed.base import Backend, StepResult
from hfdist.distributed.env import LaunchEnv
from hfdist.distributed.layout import Layout, build_mesh
from hfdist.distributed.parallelize import (
    apply_compile,
    apply_fsdp,
    apply_tp,
    data_parallel_group,
    data_parallel_mesh,
    enable_activation_checkpointing,
    tensor_parallel_mesh,
)
from hfdist.errors import HfdistError
from hfdist.export import module_tensors
from hfdist.models import load_model, resolve_model_path
from hfdist.watchdog import set_group_timeouts

logger = logging.getLogger(__name__)


def global_grad_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The L2 norm of all gradients (DTensors on any meshes), bitwise the same on every rank.

    Each rank adds the squares of its local shards, each weighted by 1 / (how many ranks hold the same shard: the
    replicas under HSDP, the tensor-parallel ranks for weights TP does not split, such as the norms), and one
    all-reduce over the whole job sums them. One collective, whatever the meshes, so every rank gets the same bits
    (DTensor's own reduction runs one all-reduce per mesh dimension, whose order can differ between groups). The
    sum is taken on the compute device: under CPU offload the gradients are on the host, the collective is not.
    """
    world = dist.get_world_size()
    copies_of: dict[int, list[torch.Tensor]] = {}
    for grad in grads:
        local, copies = grad, world
        if isinstance(grad, DTensor):
            local = grad.to_local()
            for size, placement in zip(grad.device_mesh.shape, grad.placements):
                # Shard and _StridedShard (FSDP over TP; not a Shard subclass in torch 2.13) split a dimension.
                if hasattr(placement, "dim"):
                    copies //= size
        if local.numel():
            copies_of.setdefault(copies, []).append(local)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for copies, locals_ in copies_of.items():
        norms = torch.stack(torch._foreach_norm(locals_, 2.0)).to(device, torch.float32)
        total += norms.square().sum() / copies
    dist.all_reduce(total)
    return total.sqrt()


class FSDPBackend(Backend):
    name = "fsdp"

    def __init__(self, config, env: LaunchEnv, layout: Layout):
        super().__init__(config)
        self.join_process_group(env)
        self.layout = layout
        self.mesh = build_mesh(self.device.type, layout)
        self.dp_group = data_parallel_group(self.mesh)
        # The mesh's subgroups would otherwise wait torch's default 10/30 minutes instead of distributed.timeout_s.
        set_group_timeouts(
            [self.mesh.get_group(name) for name in self.mesh.mesh_dim_names] + [self.dp_group],
            config.distributed.timeout_s,
        )
        self._root_gathered = False

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.rank)

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size

    # ---- model -------------------------------------------------------------------------------------
    def build(
        self, model_factory: Callable[[torch.device], nn.Module], optimizer_factory, scheduler_factory
    ) -> None:
        dcfg = self.config.distributed
        started = time.perf_counter()
        model = model_factory(torch.device("meta"))
        tp_mesh = tensor_parallel_mesh(self.mesh)
        if tp_mesh is not None:
            apply_tp(model.lm, tp_mesh)
        if self.config.train.activation_checkpointing:
            enable_activation_checkpointing(model.lm)
        if self.config.train.compile:
            apply_compile(model.lm)
        apply_fsdp(
            model,
            data_parallel_mesh(self.mesh),
            mixed_precision=dcfg.mixed_precision,
            cpu_offload=dcfg.cpu_offload,
        )
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
        logger.info(
            "fsdp: %d ranks (mesh %s), %.3f B parameters per rank, built in %.1f s",
            self.world_size,
            dict(zip(self.mesh.mesh_dim_names, self.mesh.shape)),
            self.params_per_rank / 1e9,
            time.perf_counter() - started,
        )

    def _fill_weights(self, model: nn.Module) -> None:
        self._fill_base_weights(model)
        # Adapters (hfdist.adapters) are not in the base model's files: each rank copies its rows of their initial
        # values, which every rank draws alike.
        params = dict(model.lm.named_parameters())
        for name, value in adapters.initial_adapter_weights(model.lm, self.config.train.seed):
            loading.copy_full_tensor(params[name], value)

    def _fill_base_weights(self, model: nn.Module) -> None:
        mcfg = self.config.model
        if mcfg.init == "random":
            loading.init_random(model.lm)
            return
        files = None
        if self.config.distributed.weight_loading == "per_rank" and not mcfg.gguf_file:
            folder = self._local_model_folder()
            files = loading.safetensors_files(folder) if folder is not None else None
        if files is not None:
            loading.load_sharded_safetensors(model, files, adapters.checkpoint_key)
            return
        if self.config.distributed.weight_loading == "per_rank":
            logger.warning(
                "fsdp: %s has no safetensors weights to read per rank: falling back to loading the "
                "whole model on rank 0 and broadcasting its shards",
                mcfg.path,
            )

        full = load_model(mcfg, torch.device("cpu")).state_dict() if self.is_main else {}
        # The base model's names, as the transformed model calls them (peft's base_layer).
        names = {adapters.checkpoint_key(n): n for n in model.lm.state_dict()}
        full = {names[k]: v for k, v in full.items() if k in names}
        loading.load_full_from_rank0(model, full, strict=self.config.adapter.type == "none")

    def _local_model_folder(self) -> Path | None:
        """The model's folder on this host; a hub id is fetched (safetensors and JSON only) once per node."""

        path = resolve_model_path(self.config.model.path)
        if Path(path).is_dir():
            return Path(path)
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
        if self.layout.replicate_degree > 1:
            # HSDP: every micro-batch reduce-scatters inside its replica (the gradients stay sharded), but only the
            # last one all-reduces the accumulated shards across replicas: one slow inter-node exchange per step.
            self.model.set_requires_all_reduce(is_last_micro_batch)
        (loss * self.dp_size).backward()

    def step(self, max_grad_norm: float, readout: Optional[torch.Tensor] = None) -> StepResult:
        params = [p for p in self.model.parameters() if p.grad is not None]
        return self._finish_step(
            params, global_grad_norm([p.grad for p in params], self.device), max_grad_norm, readout
        )

    # ---- collectives -------------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (tensor-parallel ranks hold the same values: counted once)."""
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.dp_group)
        return tensor

    def all_reduce_step_totals(self, shared: torch.Tensor, requests: torch.Tensor) -> torch.Tensor:
        tp = self.layout.tensor_parallel
        if tp == 1:
            return super().all_reduce_step_totals(shared, requests)
        # Over every rank, so that a request reaches the whole job; the ranks of a tensor-parallel group hold the same
        # shares, so only one of them (tp coordinate 0) adds them in: each data-parallel rank counts once.
        values = torch.cat([shared if self.rank % tp == 0 else torch.zeros_like(shared), requests])
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def barrier(self) -> None:
        dist.barrier()

    # ---- state ---------------------------------------------------------------------------------------
    def _reshard_root(self) -> None:
        if self._root_gathered:
            self.model.reshard()
            self._root_gathered = False

    def _state(self) -> dict:
        self._reshard_root()
        return checkpoint.trained_state(self.model, self.optimizer)

    def save_checkpoint(self, folder: Path, async_: bool = False, on_written=None):

        small: dict = {}
        if self.is_main:
            checkpoint.write_file(
                folder, "scheduler.pt", checkpoint.torch_bytes(self.scheduler.state_dict()), small, 0
            )
            topology = {
                "backend": self.name,
                "world_size": self.world_size,
                "params_per_rank0": self.params_per_rank,
                "mesh": dict(zip(self.mesh.mesh_dim_names, self.mesh.shape)),
            }
            checkpoint.write_file(folder, "topology.json", (json.dumps(topology) + "\n").encode(), small, 0)
        written = checkpoint.save_dcp(
            self._state(),
            folder,
            self.rank,
            async_=async_,
            on_written=on_written,
            process_group=self.checkpoint_group if async_ else None,
        )
        return checkpoint.merged(written, small)

    def load_checkpoint(self, folder: Path) -> None:
        if not (folder / "dcp").is_dir():
            raise HfdistError(
                f"--resume {folder}: not a DCP checkpoint (written by the deepspeed backend? "
                "resume it with distributed.backend=deepspeed)"
            )
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder / "dcp"))  # reshards when the world size differs
        checkpoint.load_trained_state(self.model, self.optimizer, state)
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    def export_tensors(self) -> list:
        """Every rank's own pieces of the sharded parameters (any mesh: the DTensor placements say where each piece
        lies), none gathered; buffers (not sharded) are written by rank 0."""

        self._reshard_root()  # evaluation leaves the root's parameters gathered: back to the sharded DTensors
        return module_tensors(self.model.lm)

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.full_tensor().detach() if isinstance(tensor, DTensor) else tensor.detach()

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
