"""Vocabulary-parallel fused linear cross-entropy: the LM head sharded over tensor-parallel ranks along V.

Rank r of ``group`` holds rows [vocab_start, vocab_start + V_r) of the [V, H] head (any split: uneven
ones, such as ``torch.chunk``'s, included). Each rank runs the fused op's chunk loop on its own V_r
columns of the logits (``cross_entropy.py``: the per-block pieces know nothing of process groups), and
this layer combines each chunk's pieces with two small all-reduces: MAX of the row maxima, then SUM of
one stacked [4, rows] fp32 tensor (sum-exp and entropy sum rescaled to the global max, sum of logits for
label smoothing, target logit). From those every rank computes the same lse, loss and entropy, then the
gradient of its own logits columns, which never leave the rank; neither the [N, V] logits nor the head
are ever gathered. ``d_hidden`` is summed over the group once, at the end (in hidden's dtype, as
tensor-parallel layers reduce their input gradients).

Collectives per call: 2 per chunk in the forward (none in the backward of "mean"/"sum", whose gradients
are computed in the forward), plus one all-reduce of d_hidden [N, H] when hidden requires grad. Every
rank must make the same call (same hidden, labels, options, chunk_size, grad mode): the chunks are sized
from ceil(vocab_size / group size) columns, which every rank computes alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .cross_entropy import (
    DEFAULT_GRAD_ACCUMULATION,
    VocabShard,
    _check_grad_accumulation,
    _check_options,
    fused_linear_cross_entropy_op,
    merge_partials,
)


class _GroupCombine:
    """Combines per-chunk partials and sums d_hidden over the ranks of one process group."""

    def __init__(self, group):
        self.group = group

    def combine(self, partials: torch.Tensor) -> torch.Tensor:
        global_max = partials[0].clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=self.group)
        sums = merge_partials(partials, global_max)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        return torch.cat([global_max[None], sums])

    def sum_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)


def vocab_parallel_fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group,
    bias_shard: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    grad_accumulation: str = DEFAULT_GRAD_ACCUMULATION,
):
    """:func:`fused_linear_cross_entropy` with the head's rows sharded over the ranks of ``group``.

    ``weight_shard`` [V_r, H] (and ``bias_shard`` [V_r]) are global classes [vocab_start, vocab_start + V_r)
    of ``vocab_size``. ``hidden`` [..., H] and ``labels`` [...] must be the same on every rank (replicated
    activations, plain tensors); ``group``: a ``torch.distributed`` process group (None: the default one).
    Returns what the unsharded op returns on the full head, the same on every rank: loss (and entropy),
    with the same definitions (label smoothing over the global V; a label outside [0, vocab_size) gives
    NaN; a label on another rank's shard is normal). Backward: ``d_hidden`` is summed over the group
    inside the op (every rank gets the full gradient of the replicated hidden), ``d_weight_shard`` is the
    true gradient of the loss w.r.t. the local shard (not scaled by the group size). The upstream
    gradient must be the same on every rank (as a replicated loss gets).
    """
    op = "vocab_parallel_fused_linear_cross_entropy"
    _check_options(op, reduction, label_smoothing, z_loss, softcap)
    _check_grad_accumulation(op, grad_accumulation)
    if isinstance(hidden, DTensor) or isinstance(weight_shard, DTensor):
        raise ValueError(
            f"{op}: hidden and weight_shard must be plain tensors (DTensor.to_local() / "
            "full_tensor()), not DTensors"
        )
    if weight_shard.dim() != 2:
        raise ValueError(f"{op}: weight_shard must be [V_r, H], got {tuple(weight_shard.shape)}")
    vocab_start, vocab_size = int(vocab_start), int(vocab_size)
    if vocab_start < 0 or vocab_start + weight_shard.shape[0] > vocab_size:
        raise ValueError(
            f"{op}: vocab_start {vocab_start} + shard rows {weight_shard.shape[0]} must lie within "
            f"[0, vocab_size={vocab_size}]"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: needs an initialized torch.distributed process group")
    world = dist.get_world_size(group)
    return fused_linear_cross_entropy_op(
        op,
        hidden,
        weight_shard,
        labels,
        bias=bias_shard,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        return_entropy=return_entropy,
        backend=backend,
        chunk_size=chunk_size,
        grad_accumulation=grad_accumulation,
        shard=VocabShard(vocab_start, vocab_size),
        comm=_GroupCombine(group),
        sizing_cols=-(-vocab_size // world),
    )


class VocabParallelFusedLinearCrossEntropyLoss(nn.Module):
    """``VocabParallelFusedLinearCrossEntropyLoss(vocab_start, vocab_size, group, ...)(hidden, weight_shard,
    labels, bias_shard=None)``: see :func:`vocab_parallel_fused_linear_cross_entropy`."""

    def __init__(
        self,
        vocab_start: int,
        vocab_size: int,
        group=None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_entropy: bool = False,
        backend: str = "auto",
        grad_accumulation: str = DEFAULT_GRAD_ACCUMULATION,
    ):
        super().__init__()
        _check_options(type(self).__name__, reduction, label_smoothing, z_loss, softcap)
        _check_grad_accumulation(type(self).__name__, grad_accumulation)
        self.vocab_start, self.vocab_size, self.group = vocab_start, vocab_size, group
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap = z_loss, softcap
        self.return_entropy, self.backend = return_entropy, backend
        self.grad_accumulation = grad_accumulation

    def forward(self, hidden, weight_shard, labels, bias_shard=None):
        return vocab_parallel_fused_linear_cross_entropy(
            hidden,
            weight_shard,
            labels,
            vocab_start=self.vocab_start,
            vocab_size=self.vocab_size,
            group=self.group,
            bias_shard=bias_shard,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            return_entropy=self.return_entropy,
            backend=self.backend,
            grad_accumulation=self.grad_accumulation,
        )
