"""What one rank holds of a sharded parameter: an FSDP2 or tensor-parallel DTensor, or a ZeRO-3 partition.

The weight loading, the fused loss, the export and the parameter counts all ask the same two questions of a
parameter, whatever backend sharded it; they ask them here.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def local_slices(tensor: DTensor) -> tuple[torch.Size, tuple[int, ...]]:
    """The shape and global offset of this rank's piece of ``tensor``."""

    return compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)


def global_numel(param: torch.Tensor) -> int:
    """A parameter's whole element count: a DTensor's numel() is global, a ZeRO-3 one keeps it in ds_numel."""
    return getattr(param, "ds_numel", None) or param.numel()
