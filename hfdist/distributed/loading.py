"""Fill a model built on the meta device and sharded by FSDP2 with pretrained (or fresh random) weights.

No rank ever holds the whole model: with safetensors, every rank reads only the rows of each tensor
that its shard owns (``safe_open(...).get_slice``), so a 70B checkpoint is read once in total across the
job and each rank's host memory holds one shard. Other formats (a .gguf, pickled .bin) are read whole
by rank 0 and broadcast shard by shard (``set_model_state_dict(..., broadcast_from_rank0=True)``).
Non-persistent buffers (the rotary inverse frequencies) are not in checkpoints; they are recomputed by
the model's own ``_init_weights``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor

from hfdist.errors import HfdistError
from hfdist.shards import local_slices

logger = logging.getLogger(__name__)

PREFIX = "lm."  # HyperfitModel keeps the Hugging Face model under .lm


def safetensors_files(folder: Path) -> Optional[dict[str, Path]]:
    """Tensor name -> file, for a folder of ``model.safetensors`` or an indexed set of shards; else None."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    return None


def _read(handle, name: str, shape: torch.Size, offset: tuple[int, ...]) -> torch.Tensor:
    view = handle.get_slice(name)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return view[index] if index else view[:]


def load_sharded_safetensors(
    model: nn.Module,
    files: dict[str, Path],
    checkpoint_key: Callable[[str], Optional[str]] = lambda name: name,
) -> None:
    """Copy each rank's rows of every parameter and persistent buffer from the safetensors files.

    ``checkpoint_key`` maps a name inside the Hugging Face model to its name in the files, or to None for a tensor
    the files do not hold (an adapter, filled by the caller)."""

    handles = {}
    try:
        state = dict(model.named_parameters())
        state.update({name: b for name, b in model.named_buffers() if _is_persistent(model, name)})
        for name, target in state.items():
            key = checkpoint_key(name[len(PREFIX) :] if name.startswith(PREFIX) else name)
            if key is None:
                continue
            if key not in files:
                raise HfdistError(
                    f"model weights: tensor {key!r} is not in the checkpoint's safetensors files "
                    "(set distributed.weight_loading=rank0_broadcast to let transformers map names)"
                )
            file = files[key]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt", device="cpu")
            shape, offset, local = _local_part(target)
            piece = _read(handles[file], key, shape, offset)
            if tuple(piece.shape) != tuple(local.shape):
                raise HfdistError(
                    f"model weights: tensor {key!r} has shape {tuple(piece.shape)} in the checkpoint "
                    f"slice, the model's shard expects {tuple(local.shape)}"
                )
            with torch.no_grad():
                local.copy_(piece.to(local.dtype))
    finally:
        handles.clear()


def _local_part(target: torch.Tensor) -> tuple[torch.Size, tuple[int, ...], torch.Tensor]:
    """(shape, global offset, local tensor) of this rank's part of a DTensor, or of a whole tensor."""
    if isinstance(target, DTensor):
        shape, offset = local_slices(target)
        return shape, offset, target.to_local()
    return target.shape, (0,) * target.dim(), target


def copy_full_tensor(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the whole tensor ``full`` into ``target`` (a DTensor shard or a whole tensor)."""
    shape, offset, local = _local_part(target)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    with torch.no_grad():
        local.copy_(full[index] if index else full)


def _is_persistent(model: nn.Module, name: str) -> bool:
    module_name, _, buffer = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer not in module._non_persistent_buffers_set


def load_full_from_rank0(
    model: nn.Module, full_lm_state: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Rank 0 passes the whole HF state dict (others {}); each rank receives its shards by broadcast. ``strict``
    False: tensors the state does not hold (adapters) are left to the caller."""

    state = {PREFIX + k: v for k, v in full_lm_state.items()}
    set_model_state_dict(
        model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    )


def init_non_persistent_buffers(lm: nn.Module) -> None:
    """Recompute the buffers checkpoints do not hold (e.g. rotary ``inv_freq``, Gemma's embedding scale) with the
    model's own init. That init also draws the module's parameters afresh (Gemma's scaled embedding holds such a
    buffer beside its weight), so the loaded parameters are put back: this rank's shards, one module at a time."""
    with torch.no_grad():
        for module in lm.modules():
            if module._non_persistent_buffers_set:
                loaded = [(p, p.detach().clone()) for p in module.parameters(recurse=False)]
                lm._init_weights(module)
                for param, value in loaded:
                    param.copy_(value)


def init_random(lm: nn.Module) -> None:
    """Fresh weights, as ``from_config`` would give them (each rank initialises its own shards)."""
    with torch.no_grad():
        for module in lm.modules():
            lm._init_weights(module)
