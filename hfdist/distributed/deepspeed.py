"""The DeepSpeed ZeRO-3 backend: ``deepspeed.initialize`` over a model partitioned while it loads.

The DeepSpeed JSON (``distributed.deepspeed_config``, examples in configs/deepspeed/) sets ZeRO-3's
buckets, bf16 and offload; hfdist fills in what follows from its own config so the two never disagree:
the batch split (micro-batch, accumulation, global batch), gradient clipping, bf16 when
``distributed.mixed_precision``, CPU offload of optimizer and parameters when ``distributed.cpu_offload``,
and ``stage3_gather_16bit_weights_on_model_save`` (without it ZeRO-3 weights export empty).

Loading: a ``HfDeepSpeedConfig`` kept alive on the backend tells transformers that ZeRO-3 is on, so
``from_pretrained`` builds the model inside ``deepspeed.zero.Init`` (each parameter partitioned as it is
created) and copies the checkpoint in one gathered parameter at a time; no rank holds the whole model.
The HyperfitModel hands ``lm_head.weight`` to the fused loss without calling the head's forward, so the
weight is registered as an external parameter of the root, which gathers it for its own forward.

Gradients: ZeRO averages over the data-parallel ranks and (by default) divides by the accumulation
steps; ``backward`` turns the latter off and multiplies by the data-parallel size, so the gradient is
that of the global mean (see base.py). Checkpoints are DeepSpeed's own (``deepspeed/`` in the folder:
partitioned model, optimizer and scheduler state) and resume at the same world size.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from transformers.integrations import HfDeepSpeedConfig

from hfdist import checkpoint
from hfdist.distributed.base import Backend, StepResult
from hfdist.distributed.env import LaunchEnv
from hfdist.distributed.parallelize import enable_activation_checkpointing
from hfdist.errors import HfdistError
from hfdist.export import ExportTensor, Piece, checkpoint_names

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "deepspeed"
DEFAULT_CONFIG = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


def read_deepspeed_config(path: str | None) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULT_CONFIG)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise HfdistError(
            f"config field distributed.deepspeed_config: cannot read {path!r} ({exc})"
        ) from None


def resolve_deepspeed_config(config, dp_size: int, accumulation: int) -> dict:
    """The DeepSpeed config dict this run uses: the user's JSON with hfdist's own settings filled in."""
    ds = read_deepspeed_config(config.distributed.deepspeed_config)
    source = config.distributed.deepspeed_config or "the built-in default"
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        raise HfdistError(
            f"config field distributed.deepspeed_config: {source} sets zero_optimization.stage "
            f"{zero.get('stage')!r}; the deepspeed backend runs ZeRO-3 (stage 3)"
        )
    if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        logger.warning(
            "deepspeed: %s lacks stage3_gather_16bit_weights_on_model_save: setting it to true "
            "(without it ZeRO-3 saves empty model weights)",
            source,
        )
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    for key in ("fp16",):
        if ds.get(key, {}).get("enabled"):
            raise HfdistError(
                f"config field distributed.deepspeed_config: {source} enables fp16; hyperfitting at "
                "lr 1e-6 needs bf16 or fp32"
            )
    if config.distributed.mixed_precision or config.model.dtype == "bfloat16":
        ds.setdefault("bf16", {})["enabled"] = True
    if ds.get("bf16", {}).get("enabled") and "communication_data_type" not in ds:
        # DeepSpeed reduces gradients in the compute dtype unless told otherwise; FSDP reduces in fp32. A bf16
        # reduce-scatter over 8-64 ranks rounds each partial sum to 8 bits of mantissa: fp32 costs twice the bytes
        # of gradient traffic and keeps the sum exact to fp32.
        logger.info("deepspeed: %s sets no communication_data_type: reducing gradients in fp32", source)
        ds["communication_data_type"] = "fp32"
    if config.distributed.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    train = config.train
    for key, value in (
        ("train_micro_batch_size_per_gpu", train.micro_batch_size),
        ("gradient_accumulation_steps", accumulation),
        ("train_batch_size", train.global_batch_size),
    ):
        if key in ds and ds[key] not in (value, "auto"):
            logger.warning(
                "deepspeed: %s sets %s=%r; hfdist uses %r (from train.*, world size %d)",
                source,
                key,
                ds[key],
                value,
                dp_size,
            )
        ds[key] = value
    ds["gradient_clipping"] = float(config.optim.max_grad_norm)
    if "optimizer" in ds or "scheduler" in ds:
        raise HfdistError(
            f"config field distributed.deepspeed_config: {source} defines an optimizer/scheduler "
            "section; hfdist builds them from optim.* (remove the section)"
        )
    return ds


def offloads_optimizer(ds: dict) -> bool:
    return ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none") not in ("none", None)


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, config, env: LaunchEnv):
        super().__init__(config)
        import deepspeed  # noqa: PLC0415 (optional: the deepspeed extra)

        self.join_process_group(env)
        # DeepSpeed adopts the process group started above instead of starting its own.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
        self.ds_config = resolve_deepspeed_config(config, self.dp_size, self.gradient_accumulation_steps())
        self.apply_host_threads()  # now that the JSON says whether the optimizer runs on the host
        self._hf_ds_config = None
        self.engine = None

    def build(
        self, model_factory: Callable[[torch.device], nn.Module], optimizer_factory, scheduler_factory
    ) -> None:
        import deepspeed  # noqa: PLC0415 (optional: the deepspeed extra)

        started = time.perf_counter()
        # Must stay referenced while models load: transformers looks it up through a weak reference.
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        model = model_factory(self.device)
        if self.config.train.activation_checkpointing:
            enable_activation_checkpointing(model.lm)
        head = model.lm.get_output_embeddings()
        for param in head.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(model, param)
        if offloads_optimizer(self.ds_config):
            optimizer = self._cpu_adam(model)
        else:
            optimizer = optimizer_factory(model)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler_factory,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.engine = engine
        self.model = engine
        self.optimizer = optimizer
        self.scheduler = scheduler
        local = sum(p.ds_tensor.numel() for p in engine.module.parameters() if hasattr(p, "ds_tensor"))
        self.params_per_rank = local
        logger.info(
            "deepspeed: ZeRO-3 over %d ranks, %.3f B parameters per rank, bf16 %s, offload %s, built in "
            "%.1f s",
            self.world_size,
            local / 1e9,
            self.ds_config.get("bf16", {}).get("enabled", False),
            offloads_optimizer(self.ds_config),
            time.perf_counter() - started,
        )

    def optimizer_on_host(self) -> bool:
        return hasattr(self, "ds_config") and offloads_optimizer(self.ds_config)

    def _cpu_adam(self, model: nn.Module):
        """ZeRO-Offload steps the optimizer on the host: DeepSpeed's CPU Adam (a JIT-built op) with optim.*."""
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: PLC0415 (optional: the deepspeed extra)

        optim = self.config.optim
        return DeepSpeedCPUAdam(
            [p for p in model.parameters() if p.requires_grad],
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            adamw_mode=optim.name == "adamw",
        )

    # ---- training ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)
        if not is_last_micro_batch:
            self.engine.step()  # a micro-step: DeepSpeed only counts it; the optimizer steps at the boundary

    def step(self, max_grad_norm: float, readout: Optional[torch.Tensor] = None) -> StepResult:
        """ZeRO-3 checks the global gradient norm itself: a NaN/inf norm makes DeepSpeed skip the optimizer and
        LR-scheduler step and zero the gradients (``was_step_applied()`` is then False), the same skip as the other
        backends. A non-finite loss whose gradient norm is finite cannot be skipped after the fact: DeepSpeed has
        already applied the update, so that stops the run with an error."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("deepspeed: step() called off the gradient-accumulation boundary")
        self.engine.step()  # clips at gradient_clipping (= optim.max_grad_norm), steps optimizer and scheduler
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        values = readout.detach().float().reshape(-1).tolist() if readout is not None else []  # the host sync
        if applied and not all(math.isfinite(v) for v in values):
            raise HfdistError(
                f"deepspeed: step {self.engine.global_steps}: non-finite loss {values[0]} with a finite "
                f"gradient norm {norm:g}; DeepSpeed has applied the update, so the run stops here "
                "(the last checkpoint is unaffected)"
            )
        return StepResult(norm, values, applied)

    def current_lr(self) -> float:
        return self.engine.get_lr()[0]

    # ---- collectives -------------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    # ---- state ---------------------------------------------------------------------------------------
    def save_checkpoint(self, folder: Path, async_: bool = False, on_written=None):
        """DeepSpeed's own checkpoint; the files this rank's engine writes are hashed right after they are written
        (from the page cache, every rank its own at the same time). ``async_`` is refused by the config check."""

        engine_save = self.engine.checkpoint_engine.save
        paths: list[str] = []

        def save_and_record(state_dict, path, *args, **kwargs):
            result = engine_save(state_dict, path, *args, **kwargs)
            paths.append(str(path))
            return result

        self.engine.checkpoint_engine.save = save_and_record
        try:
            # Frozen parameters (hfdist.adapters) are the base model's: the run loads them anyway.
            self.engine.save_checkpoint(
                str(folder), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=self._frozen()
            )
        finally:
            del self.engine.checkpoint_engine.save  # the engine's own method again
        if on_written is not None:
            on_written()
        records = checkpoint.record_written_files(folder, paths, self.rank)
        if self.is_main:
            topology = {
                "backend": self.name,
                "world_size": self.world_size,
                "params_per_rank0": self.params_per_rank,
            }
            checkpoint.write_file(folder, "topology.json", (json.dumps(topology) + "\n").encode(), records, 0)
        return checkpoint.completed(records)

    def _frozen(self) -> bool:
        return any(not p.requires_grad for p in self.engine.module.parameters())

    def load_checkpoint(self, folder: Path) -> None:
        if not (folder / CHECKPOINT_TAG).is_dir():
            raise HfdistError(
                f"--resume {folder}: not a DeepSpeed checkpoint (written by the fsdp or single "
                "backend? resume it with that backend)"
            )
        topology = folder / "topology.json"
        saved = json.loads(topology.read_text()).get("world_size") if topology.is_file() else None
        if saved is not None and saved != self.world_size:
            raise HfdistError(
                f"--resume {folder}: DeepSpeed ZeRO-3 checkpoint of {saved} ranks cannot resume on "
                f"{self.world_size}; use {saved} ranks (the fsdp backend resumes at any world size)"
            )
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=CHECKPOINT_TAG, load_module_strict=not self._frozen()
        )
        if path is None:
            raise HfdistError(f"--resume {folder}: DeepSpeed could not load the checkpoint")

    def export_tensors(self) -> list:
        """Each rank's own ZeRO-3 partitions, from the fp32 master copy (bf16 parameters would round away updates of
        lr 1e-6), as flat element ranges: a partition is a contiguous range of the flattened parameter, so it is
        written straight into the safetensors file; nothing is gathered. Buffers (not partitioned) from rank 0."""
        from deepspeed.utils import safe_get_local_fp32_param  # noqa: PLC0415 (optional: the deepspeed extra)

        result = []
        for name, tensor in checkpoint_names(self.engine.module.lm):
            shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
            if not hasattr(tensor, "ds_tensor"):
                pieces = [Piece((0,) * len(shape), shape, tensor)] if self.is_main else []
                result.append(ExportTensor(name, shape, pieces))
                continue
            partition = tensor.ds_tensor.ds_numel
            start = dist.get_rank(group=tensor.ds_process_group) * partition
            count = max(0, min(partition, tensor.ds_numel - start))
            local = safe_get_local_fp32_param(tensor)
            if local is None:  # a frozen parameter has no master copy: its own partition
                local = tensor.ds_tensor
            result.append(
                ExportTensor(name, shape, [Piece((start,), (count,), local.reshape(-1)[:count], flat=True)])
            )
        return result

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A trainable parameter's whole fp32 master value (gathered from its partitions), on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415 (optional: the deepspeed extra)

        return safe_get_full_fp32_param(tensor).detach()

    def unwrapped_lm(self) -> nn.Module:
        return self.engine.module.lm

    def close(self) -> None:
        self._hf_ds_config = None
        if dist.is_initialized():
            dist.destroy_process_group()
