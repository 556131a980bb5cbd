"""Cross-entropy on given logits, and fused linear cross-entropy (LM head + loss) that never builds [N, V].

Exact definitions, per token i with label y and logits row x over V classes:

    z       = softcap * tanh(x / softcap)      if softcap else x         (Gemma 2 soft-capping)
    lse     = logsumexp_j z_j
    loss_i  = (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j) + z_loss * lse**2
    entropy = -sum_j p_j log p_j,  p = softmax(z)                          (nats)

``eps`` = ``label_smoothing`` (the same loss as ``F.cross_entropy(label_smoothing=eps)``); ``z_loss`` is
PaLM's auxiliary loss, added per token. Tokens with ``y == ignore_index`` have loss 0, entropy 0 and no
gradient. A label outside [0, V) that is not ``ignore_index`` gives that token a NaN loss and NaN
gradients (a flagged result: no host sync, no out-of-bounds read). Losses, lse and entropy are fp32
whatever the input dtype. ``reduction``: "none" (per token, the labels' shape), "sum", or "mean" =
sum / max(#non-ignored tokens, 1), so that a batch with every token ignored gives loss 0 and zero
gradients, not NaN. The entropy is a by-product for logging: it is not differentiated (its gradient is
taken as zero).

The per-row math comes in pieces that know nothing of process groups, so that a vocabulary-parallel
layer (``vocab_parallel.py``) can run them on one shard of the columns and combine them across ranks:
``partial`` (a block's max m, S = sum e^(z-m), T = sum e^(z-m)(z-m), sum z and the target logit, in the
order of PARTIALS), ``merge_partials`` (rescale a shard's sums to the global max), ``finish_rows`` (loss,
lse, entropy from combined partials) and ``grad`` (d loss / d logits of a block from a given lse). A
``VocabShard`` says which global columns a block holds; the unsharded op is the one-shard case (and its
Triton path fuses pass 1 and the gradient in one launch).

Numerics of the fused op (both backends): the logits of a chunk are computed in the inputs' dtype
(as ``F.linear`` would), everything after that in fp32; the gradient w.r.t. the logits is rounded once
to the inputs' dtype for the two gradient matmuls. For reduction "mean"/"sum" the gradients are
computed during the forward pass, chunk by chunk, and only scaled by the incoming gradient in backward
(so ``backward`` may run once per forward); for "none" the forward saves lse and the backward
recomputes the logits chunk by chunk. Under ``torch.no_grad()`` (or when nothing requires grad) only
the loss is computed.

Weight-gradient accumulation over the chunks (``grad_accumulation``; a weight of 4 bytes or more is
accumulated in its own dtype either way):
  "weight_dtype" (default): one [V, H] tensor in the weight's dtype; each chunk adds its product with
      ``addmm`` (beta=1): the GEMM computes acc + dlogits^T @ hidden in fp32 and rounds once per chunk.
  "fp32": an fp32 accumulator (cuBLAS ``addmm(out_dtype=float32)``: fp32 += bf16 @ bf16 in one call),
      rounded once at the end, in place, so that ``weight.grad`` owns exactly V*H*2 bytes. Where that
      addmm fails (checked once per GPU) it falls back to "weight_dtype" and logs so once; on CPU the
      operands are upcast slice by slice (CPU has no mixed-dtype addmm).
  Error of d_weight against fp64: "fp32" stays at its floor whatever the chunk count (the exact sum of the
  same bf16 d_logits, rounded once); in "weight_dtype" the rounding of the running sum dominates and grows
  like sqrt(chunks), never above a bf16 running sum with two roundings per chunk (Liger's
  ``grad_weight += mm(...)``). Default: "weight_dtype": the only mode within the memory goal below, and at
  hfdist's micro-batches (<= 8192 tokens, <= 16 chunks on the Llama 3 head) close to fp32's error, while a
  bf16 model's gradient is rounded to bf16 anyway, and again at each gradient-accumulation step. Ask for
  "fp32" for the floor where the extra V x H x 2 bytes are affordable, e.g. with large N (32 chunks and
  more). The errors measured by test_weight_grad_accumulation_error: docs/kernels.md.

Memory (extra bytes beyond the inputs, gradients included; Llama 3 head H=4096, V=128256, bf16,
N=16384 tokens, Triton backend, the default budget): chunk rows = 512 (CHUNK_BUDGET_BYTES bounds all a
chunk holds: its [rows, V] logits block, which its gradient overwrites, plus the torch backend's fp32
temporaries and the CPU upcast slices, per ``chunk_bytes_per_row``), so
  weight_dtype: d_weight 1,050,673,152 + d_hidden 134,217,728 + logits block 131,334,144 + per-token
      fp32 rows 196,608 = 1,316,421,632 bytes = 1.226 GiB (goal: Liger's 1.23 GiB);
  fp32: d_weight accumulator 2,101,346,304 instead of 1,050,673,152: 2,367,094,784 bytes = 2.205 GiB at
      the peak (the forward), and a 1,050,673,152-byte gradient afterwards.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .utils import (
    GRAD_ACCUMULATIONS,
    UPCAST_SLICE_ROWS,
    WeightGradAccumulator,
    accumulator_dtype,
    auto_backend,
    check_interpreted,
    chunk_rows,
    grad_accumulation_path,
    resolve_backend,
)

REDUCTIONS = ("mean", "sum", "none")
DEFAULT_GRAD_ACCUMULATION = "weight_dtype"
PARTIALS = ("max", "sumexp", "entropy_sum", "sum_z", "z_label")  # rows of a partials tensor [5, rows]

# One budget for everything a chunk holds at once (chunk_bytes_per_row), whatever the backend, device and
# accumulation: 128 MiB is 512 rows of the Llama 3 head in bf16, which keeps the op at N=16384 within
# Liger's 1.23 GiB (module docstring). HFDIST_FLCE_CHUNK_MB overrides it (tuning on a new GPU).
CHUNK_BUDGET_BYTES = 128 << 20
_TORCH_FP32_TEMPS = 2  # the torch backend's [rows, V] fp32 temporaries: capped logits z and exp
_PER_ROW_OUTPUTS = 8 * 4  # fp32 loss, lse, entropy and the five partials of each row


@dataclass(frozen=True)
class CEOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None


@dataclass(frozen=True)
class VocabShard:
    """The columns of a block of logits: global classes [start, start + block width) of ``num_classes``."""

    start: int
    num_classes: int


def _check_options(op: str, reduction: str, label_smoothing: float, z_loss: float, softcap) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if float(z_loss) < 0.0:
        raise ValueError(f"{op}: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"{op}: softcap must be > 0 or None, got {softcap}")


def _check_grad_accumulation(op: str, grad_accumulation: str) -> None:
    if grad_accumulation not in GRAD_ACCUMULATIONS:
        raise ValueError(
            f"{op}: grad_accumulation must be one of {GRAD_ACCUMULATIONS}, got {grad_accumulation!r}"
        )


# ---------------------------------------------------------------------------------------------------
# Per-row math on one block of logits: the torch reference (the Triton kernel computes the same).
# ---------------------------------------------------------------------------------------------------


def _capped_fp32(x: torch.Tensor, opts: CEOptions, clobber: bool) -> torch.Tensor:
    """fp32 z of a block (soft-capped); may be ``x`` itself when ``clobber`` and x is fp32."""
    z = x.float()
    if z.data_ptr() == x.data_ptr() and not clobber:
        z = z.clone()
    if opts.softcap:
        z.div_(opts.softcap).tanh_().mul_(opts.softcap)
    return z


def _label_masks(labels: torch.Tensor, opts: CEOptions, num_classes: int):
    valid = labels != opts.ignore_index
    out_of_range = valid & ((labels < 0) | (labels >= num_classes))
    return valid, out_of_range


def ce_partial_torch(
    x: torch.Tensor,
    labels: torch.Tensor,
    opts: CEOptions,
    shard: VocabShard,
    *,
    want_entropy: bool,
    clobber: bool = False,
):
    """Partials [5, rows] (PARTIALS order, fp32) of a block ``x`` [rows, cols] holding ``shard``'s columns.

    max m, S = sum e^(z-m), T = sum e^(z-m)(z-m) (0 without ``want_entropy``), sum z, and z at the label
    when the label is one of the block's columns (else 0). Returns (partials, scratch): scratch is the
    fp32 z - m and m, reused by ``ce_grad_torch`` (``clobber`` allows using ``x`` as that scratch).
    """
    z = _capped_fp32(x, opts, clobber)
    cols = z.shape[1]
    target = labels - shard.start
    hit = (labels != opts.ignore_index) & (target >= 0) & (target < cols)
    z_label = torch.where(hit, z.gather(1, torch.where(hit, target, 0)[:, None]).squeeze(1), 0.0)
    sum_z = z.sum(dim=1)
    m = z.amax(dim=1)
    # A block of only -inf has no mass: shift by 0 so that e = 0 (not NaN), as the kernel's guards do.
    z.sub_(torch.where(m == -math.inf, 0.0, m)[:, None]).clamp_min_(torch.finfo(torch.float32).min)
    e = z.exp()
    s = e.sum(dim=1)
    t = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1) if want_entropy else torch.zeros_like(s)
    del e
    return torch.stack([m, s, t, sum_z, z_label]), (z, torch.where(m == -math.inf, 0.0, m))


def merge_partials(partials: torch.Tensor, global_max: torch.Tensor) -> torch.Tensor:
    """A shard's partials rescaled to the global row max: [4, rows] (S, T, sum z, z_label) to sum over shards.

    With alpha = e^(m - M): S -> alpha S, T -> alpha (T + (m - M) S); sum z and z_label add as they are.
    A shard with no mass (S = 0, m = -inf) contributes 0, not NaN.
    """
    m, s, t, sum_z, z_label = partials.unbind(0)
    has_mass = s > 0
    shift = torch.where(has_mass, m - global_max, 0.0)
    alpha = torch.where(has_mass, shift.exp(), 0.0)
    return torch.stack([alpha * s, alpha * (t + shift * s), sum_z, z_label])


def finish_rows(
    partials: torch.Tensor, labels: torch.Tensor, opts: CEOptions, num_classes: int, want_entropy: bool
):
    """loss, lse, entropy (fp32 [rows]; entropy None unless wanted) from partials over all V columns."""
    m, s, t, sum_z, z_label = partials.unbind(0)
    log_s = s.log()
    lse = m + log_s
    loss = lse - z_label
    eps = float(opts.label_smoothing)
    if eps:
        loss = (1.0 - eps) * loss + eps * (lse - sum_z / num_classes)
    if opts.z_loss:
        loss = loss + opts.z_loss * lse * lse
    valid, out_of_range = _label_masks(labels, opts, num_classes)
    loss = torch.where(out_of_range, math.nan, torch.where(valid, loss, 0.0))
    entropy = None
    if want_entropy:
        entropy = torch.where(valid, (log_s - t / s).clamp_min(0.0), 0.0)
    return loss, lse, entropy


def ce_grad_torch(
    x: torch.Tensor,
    scratch,
    labels: torch.Tensor,
    lse: torch.Tensor,
    opts: CEOptions,
    shard: VocabShard,
    *,
    grad_scale: torch.Tensor,
    grad_out: torch.Tensor,
) -> None:
    """d(loss_i * grad_scale_i)/dx of block ``x`` from each row's (global) lse, written into ``grad_out``.

    ``scratch``: what ``ce_partial_torch`` returned for this block (else z is recomputed from ``x``,
    which is then used as scratch). ``grad_out`` may be ``x``. d loss / d z = p (1 + 2 z_loss lse)
    - eps / V - (1 - eps) [j == y]; times dz/dx = 1 - tanh^2 with softcap.
    """
    if scratch is None:
        z, shift = _capped_fp32(x, opts, clobber=True), None
    else:
        z, shift = scratch
    cols = z.shape[1]
    grad = torch.sub(z, (lse if shift is None else lse - shift)[:, None]).exp_()  # p over the global V
    if opts.z_loss:
        grad.mul_((1.0 + 2.0 * opts.z_loss * lse)[:, None])
    eps = float(opts.label_smoothing)
    if eps:
        grad.sub_(eps / shard.num_classes)
    valid, out_of_range = _label_masks(labels, opts, shard.num_classes)
    target = labels - shard.start
    hit = valid & (target >= 0) & (target < cols)
    grad.scatter_add_(1, torch.where(hit, target, 0)[:, None], (-(1.0 - eps) * hit.float())[:, None])
    if opts.softcap:
        if shift is not None:
            z.add_(shift[:, None])
        grad.mul_(z.div_(opts.softcap).square_().neg_().add_(1.0))
    row_scale = torch.where(valid, grad_scale.float(), 0.0)
    grad.mul_(torch.where(out_of_range, math.nan, row_scale)[:, None])
    grad_out.copy_(grad)


def ce_rows_torch(
    x: torch.Tensor,
    labels: torch.Tensor,
    opts: CEOptions,
    shard: VocabShard | None = None,
    *,
    want_entropy: bool,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    clobber: bool = False,
):
    """Loss, lse and entropy (fp32, [rows]) of a [rows, V] block of raw logits ``x`` (all V columns).

    With ``grad_scale`` (fp32, shape [] or [rows]) also writes d(loss_i * grad_scale_i)/dx into
    ``grad_out`` (which may be ``x`` itself). ``clobber`` allows using ``x`` as fp32 scratch.
    """
    shard = shard or VocabShard(0, x.shape[1])
    partials, scratch = ce_partial_torch(x, labels, opts, shard, want_entropy=want_entropy, clobber=clobber)
    loss, lse, entropy = finish_rows(partials, labels, opts, shard.num_classes, want_entropy)
    if grad_scale is not None:
        ce_grad_torch(x, scratch, labels, lse, opts, shard, grad_scale=grad_scale, grad_out=grad_out)
    return loss, lse, entropy


def _pieces(backend: str):
    """The per-block functions of a backend: rows (unsharded, fused), partial, grad."""
    if backend == "torch":
        return SimpleNamespace(rows=ce_rows_torch, partial=ce_partial_torch, grad=ce_grad_torch)
    from . import _triton_cross_entropy as tce  # noqa: PLC0415 (optional: triton, imported once TRITON_INTERPRET is settled)

    return SimpleNamespace(rows=tce.ce_rows_triton, partial=tce.ce_partial_triton, grad=tce.ce_grad_triton)


def _require_interpreted_on_cpu(resolved: str, device: torch.device, op: str) -> None:
    if resolved == "triton" and device.type == "cpu":
        from . import _triton_cross_entropy as tce  # noqa: PLC0415 (optional: triton, imported once TRITON_INTERPRET is settled)

        check_interpreted(tce._ce_kernel, op)


# ---------------------------------------------------------------------------------------------------
# The chunk loop of the fused op.
# ---------------------------------------------------------------------------------------------------


def chunk_budget_bytes() -> int:
    env = os.environ.get("HFDIST_FLCE_CHUNK_MB")
    return int(float(env) * (1 << 20)) if env else CHUNK_BUDGET_BYTES


def chunk_bytes_per_row(
    num_cols: int,
    hidden_size: int,
    dtype: torch.dtype,
    backend: str,
    accumulation_method: str | None,
    logits_block: bool = True,
) -> int:
    """Bytes a chunk holds per row of tokens: every temporary of this backend and accumulation path.

    The [rows, V] logits block in the inputs' dtype (its gradient overwrites it; not counted for
    ``cross_entropy``, whose logits are the caller's), the torch backend's fp32 copies, the CPU upcast
    path's fp32 slices of the gradient and of the hidden chunk, and the per-row fp32 outputs.
    """
    per_row = _PER_ROW_OUTPUTS
    if logits_block:
        per_row += num_cols * torch.empty((), dtype=dtype).element_size()
    if backend == "torch":
        per_row += num_cols * 4 * _TORCH_FP32_TEMPS
    if accumulation_method == "upcast":
        per_row += (hidden_size + min(num_cols, UPCAST_SLICE_ROWS)) * 4
    return per_row


@dataclass(frozen=True)
class Workspace:
    """What one call of the fused op holds beyond its inputs while it runs, by the sizing the op itself uses."""

    chunk_rows: int  # tokens per chunk (chunk_rows under chunk_budget_bytes)
    chunk_bytes: int  # everything one chunk holds at once: chunk_rows x chunk_bytes_per_row
    accumulator_dtype: torch.dtype  # the weight gradient's accumulator over the chunks
    accumulator_bytes: int  # [vocabulary columns, hidden] in that dtype (it becomes the weight's gradient)


def _chunk_sizing(num_rows, num_cols, hidden_size, dtype, backend, accumulation_method) -> tuple[int, int]:
    """(rows per chunk, bytes a chunk holds per row): the fused op's chunks, also described by fused_workspace."""
    per_row = chunk_bytes_per_row(num_cols, hidden_size, dtype, backend, accumulation_method)
    return chunk_rows(num_rows, per_row, chunk_budget_bytes()), per_row


def fused_workspace(
    num_rows: int,
    num_cols: int,
    hidden_size: int,
    dtype: torch.dtype,
    *,
    device_type: str = "cuda",
    backend: str = "auto",
    grad_accumulation: str = DEFAULT_GRAD_ACCUMULATION,
) -> Workspace:
    """The workspace of one training call of the fused op on ``num_rows`` tokens and ``num_cols`` vocabulary
    columns (a tensor-parallel rank's: ceil(V / ranks)) of width ``hidden_size`` in ``dtype``, on a device of
    ``device_type``, with the chunk sizing the op runs (``chunk_budget_bytes``, ``chunk_bytes_per_row``,
    ``chunk_rows``). For planning: "auto" is taken as it resolves where triton is installed, and "fp32"
    accumulation of a 2-byte weight as available (the op falls back to the weight's dtype where it is not)."""
    resolved = auto_backend(device_type) if backend == "auto" else backend
    acc_dtype = accumulator_dtype(grad_accumulation, dtype)
    method = "addmm" if acc_dtype == dtype else "addmm_out_fp32" if device_type == "cuda" else "upcast"
    rows, per_row = _chunk_sizing(num_rows, num_cols, hidden_size, dtype, resolved, method)
    acc_bytes = num_cols * hidden_size * torch.empty((), dtype=acc_dtype).element_size()
    return Workspace(rows, rows * per_row, acc_dtype, acc_bytes)


@dataclass(frozen=True)
class _Plan:
    """Everything but the tensors: how one call of the fused op runs."""

    opts: CEOptions
    reduction: str
    want_entropy: bool
    backend: str
    rows: int
    accumulation: Any  # utils.AccumulationPath
    shard: VocabShard
    comm: Any = (
        None  # None, or an object with combine(partials) -> partials and sum_(tensor) (vocab_parallel.py)
    )


def _run_chunks(hidden, weight, bias, labels, plan: _Plan, *, need_grads, grad_scale=None, saved_lse=None):
    """Loop over row chunks: logits = hidden @ weight.T + bias, then the per-row pieces.

    ``need_grads`` = (hidden, weight, bias). With ``saved_lse`` (backward of reduction "none") the
    gradient comes from the forward's lse and no loss is computed. With ``plan.comm`` (vocabulary
    shards) each chunk's partials are combined across ranks before lse, and d_hidden is summed across
    them at the end. Returns loss, lse, entropy, d_hidden, d_weight (a WeightGradAccumulator), d_bias
    (fp32); entries not asked for are None.
    """
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    opts, shard, rows = plan.opts, plan.shard, plan.rows
    pieces = _pieces(plan.backend)
    compute_grad = any(need_grads)
    forward = saved_lse is None
    want_entropy = plan.want_entropy and forward
    loss = torch.empty(num_rows, device=device, dtype=torch.float32) if forward else None
    lse = torch.empty(num_rows, device=device, dtype=torch.float32) if forward else None
    entropy = torch.empty(num_rows, device=device, dtype=torch.float32) if want_entropy else None
    d_hidden = torch.empty_like(hidden) if need_grads[0] else None
    d_weight = (
        WeightGradAccumulator(weight.shape, weight.dtype, device, plan.accumulation)
        if need_grads[1]
        else None
    )
    d_bias = torch.zeros(vocab, device=device, dtype=torch.float32) if need_grads[2] else None
    block = torch.empty(min(rows, num_rows), vocab, device=device, dtype=hidden.dtype)
    weight_t = weight.t()
    for start in range(0, num_rows, rows):
        end = min(start + rows, num_rows)
        h, y = hidden[start:end], labels[start:end]
        x = block[: end - start]
        if bias is None:
            torch.mm(h, weight_t, out=x)
        else:
            torch.addmm(bias, h, weight_t, out=x)
        scale = None
        if compute_grad:
            scale = grad_scale if grad_scale.dim() == 0 else grad_scale[start:end]
        if not forward:
            pieces.grad(x, None, y, saved_lse[start:end], opts, shard, grad_scale=scale, grad_out=x)
        elif plan.comm is None:
            extra = dict(clobber=True) if plan.backend == "torch" else {}
            l_, s_, e_ = pieces.rows(
                x,
                y,
                opts,
                shard,
                want_entropy=want_entropy,
                grad_scale=scale,
                grad_out=x if compute_grad else None,
                **extra,
            )
        else:
            extra = dict(clobber=True) if plan.backend == "torch" else {}
            partials, scratch = pieces.partial(x, y, opts, shard, want_entropy=want_entropy, **extra)
            l_, s_, e_ = finish_rows(plan.comm.combine(partials), y, opts, shard.num_classes, want_entropy)
            if compute_grad:
                pieces.grad(x, scratch, y, s_, opts, shard, grad_scale=scale, grad_out=x)
            del scratch
        if forward:
            loss[start:end] = l_
            lse[start:end] = s_
            if want_entropy:
                entropy[start:end] = e_
        if compute_grad:  # x now holds d loss / d logits of this chunk, in the inputs' dtype
            if d_hidden is not None:
                torch.mm(x, weight, out=d_hidden[start:end])
            if d_weight is not None:
                d_weight.add_(x.t(), h)
            if d_bias is not None:
                d_bias += x.sum(dim=0, dtype=torch.float32)
    del block
    if plan.comm is not None and d_hidden is not None:
        plan.comm.sum_(d_hidden)  # each rank's logits cover its shard: d_hidden is the sum over shards
    return loss, lse, entropy, d_hidden, d_weight, d_bias


def _reduce(loss_rows, valid, reduction):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(torch.float32)


def _finish_bias_grad(acc, scale, dtype):
    """fp32 bias-gradient accumulator -> the gradient in the bias's dtype, as a tensor of its own."""
    if acc is None:
        return None
    if scale is not None:
        acc = acc.mul_(scale)
    return acc if dtype == torch.float32 else acc.to(dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, plan):
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        valid = labels != plan.opts.ignore_index
        ctx.plan, ctx.need, ctx.used = plan, need, False
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if plan.reduction == "none":
            loss_rows, lse, entropy, *_ = _run_chunks(
                hidden, weight, bias, labels, plan, need_grads=(False,) * 3
            )
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        else:
            if plan.reduction == "mean":
                scale = 1.0 / valid.sum().clamp_min(1).to(torch.float32)
            else:
                scale = torch.ones((), device=hidden.device, dtype=torch.float32)
            loss_rows, _, entropy, d_h, d_w, d_b = _run_chunks(
                hidden, weight, bias, labels, plan, need_grads=need, grad_scale=scale
            )
            ctx.grads = (d_h, d_w, d_b)  # intermediates, not inputs or outputs: kept as plain attributes
        loss = _reduce(loss_rows, valid, plan.reduction)
        if plan.want_entropy:
            ctx.mark_non_differentiable(entropy)
            return loss, entropy
        return loss

    @staticmethod
    def backward(ctx, grad_loss, *unused_grad_entropy):
        if ctx.used:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward may run only once per forward "
                "(the gradients are computed in the forward pass and scaled in place)"
            )
        ctx.used = True
        grad_loss = grad_loss.float()
        if ctx.plan.reduction == "none":
            hidden, weight, bias, labels, lse = ctx.saved_tensors
            _, _, _, d_h, d_w, d_b = _run_chunks(
                hidden,
                weight,
                bias,
                labels,
                ctx.plan,
                need_grads=ctx.need,
                grad_scale=grad_loss.contiguous(),
                saved_lse=lse,
            )
            scale = None
        else:
            (d_h, d_w, d_b), ctx.grads = ctx.grads, None
            if d_h is not None:
                d_h = d_h.mul_(grad_loss)
            scale = grad_loss
        d_w = d_w.finish(scale) if d_w is not None else None
        d_b = _finish_bias_grad(d_b, scale, ctx.bias_dtype)
        return d_h, d_w, d_b, None, None


def _check_linear_inputs(op, hidden, weight, labels, bias):
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden [..., H] and weight [V, H] do not match: {tuple(hidden.shape)} vs "
            f"{tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"{op}: labels {tuple(labels.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"{op}: hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
            f"{'' if bias is None else ', ' + str(bias.dtype)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: labels must be int64 or int32, got {labels.dtype}")


def fused_linear_cross_entropy_op(
    op: str,
    hidden,
    weight,
    labels,
    *,
    bias,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    return_entropy,
    backend,
    chunk_size,
    grad_accumulation,
    shard: VocabShard | None = None,
    comm=None,
    sizing_cols: int | None = None,
):
    """The fused op on ``weight``'s rows, which are ``shard``'s classes (default: all of them).

    ``comm`` combines partials across shards (vocab_parallel.py); ``sizing_cols`` is the column count
    that sizes the chunks (the same on every rank of a group, so that all run the same chunks).
    """
    _check_options(op, reduction, label_smoothing, z_loss, softcap)
    _check_grad_accumulation(op, grad_accumulation)
    _check_linear_inputs(op, hidden, weight, labels, bias)
    resolved = resolve_backend(backend, hidden.device, op)
    _require_interpreted_on_cpu(resolved, hidden.device, op)
    shape = labels.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if hidden2.stride(-1) != 1:
        hidden2 = hidden2.contiguous()
    labels1 = labels.reshape(-1).long().contiguous()
    weight_c = weight if weight.is_contiguous() else weight.contiguous()
    shard = shard or VocabShard(0, weight.shape[0])
    opts = CEOptions(
        int(ignore_index), float(label_smoothing), float(z_loss), None if softcap is None else float(softcap)
    )
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    path = grad_accumulation_path(grad_accumulation, weight.dtype, hidden.device) if grad_wanted else None
    if chunk_size:
        rows = int(chunk_size)
    else:
        rows, _ = _chunk_sizing(
            hidden2.shape[0],
            sizing_cols or weight.shape[0],
            hidden2.shape[1],
            hidden.dtype,
            resolved,
            path.method if path is not None else None,
        )
    plan = _Plan(opts, reduction, bool(return_entropy), resolved, max(1, rows), path, shard, comm)
    if hidden2.shape[0] == 0:
        zero = hidden2.sum() * 0.0 + weight_c.sum() * 0.0
        loss = labels1.new_zeros(labels1.shape, dtype=torch.float32) if reduction == "none" else zero.float()
        ent = labels1.new_zeros(shape, dtype=torch.float32)
        return (loss.reshape(shape) if reduction == "none" else loss, ent) if return_entropy else loss
    if grad_wanted:
        out = _FusedLinearCrossEntropy.apply(hidden2, weight_c, bias, labels1, plan)
    else:  # no autograd graph wanted: the loss only, no gradient work
        loss_rows, _, entropy, *_ = _run_chunks(
            hidden2, weight_c, bias, labels1, plan, need_grads=(False,) * 3
        )
        loss = _reduce(loss_rows, labels1 != opts.ignore_index, reduction)
        out = (loss, entropy) if return_entropy else loss
    if return_entropy:
        loss, entropy = out
        return (loss.view(shape) if reduction == "none" else loss), entropy.view(shape)
    return out.view(shape) if reduction == "none" else out


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
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
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, without the [N, V] logits.

    ``hidden`` [..., H], ``weight`` [V, H] (the LM head), ``labels`` [...] (hidden's leading shape).
    Returns the loss (fp32; per token, labels' shape, for ``reduction="none"``), and with
    ``return_entropy=True`` also the per-token entropy (fp32, nats, 0 at ignored tokens; not
    differentiated). Differentiable in ``hidden``, ``weight`` and ``bias``. Definitions: module docstring.
    ``chunk_size`` overrides the rows per chunk (default: as many as fit CHUNK_BUDGET_BYTES with every
    temporary counted). No host synchronisation.

    ``grad_accumulation``: "weight_dtype" (default) accumulates the weight gradient over the chunks in the
    weight's dtype (fp32 math, one rounding per chunk); "fp32" in fp32, rounded once at the end. Extra
    memory on the Llama 3 head (H=4096, V=128256, bf16) at N=16384, gradients included: 1.226 GiB
    (1,316,421,632 bytes) with "weight_dtype" (Liger: 1.23 GiB), 2.205 GiB (2,367,094,784 bytes) with
    "fp32"; the errors against fp64 and the reasons for the default: module docstring, docs/kernels.md.
    """
    return fused_linear_cross_entropy_op(
        "fused_linear_cross_entropy",
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        return_entropy=return_entropy,
        backend=backend,
        chunk_size=chunk_size,
        grad_accumulation=grad_accumulation,
    )


# ---------------------------------------------------------------------------------------------------
# Cross-entropy on given logits.
# ---------------------------------------------------------------------------------------------------


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, opts, reduction, want_entropy, backend, rows):
        pieces = _pieces(backend)
        shard = VocabShard(0, logits.shape[1])
        num_rows = logits.shape[0]
        loss_rows = torch.empty(num_rows, device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(loss_rows)
        entropy = torch.empty_like(loss_rows) if want_entropy else None
        for start in range(0, num_rows, rows):  # chunked so that the fp32 temporaries stay bounded
            end = min(start + rows, num_rows)
            l_, s_, e_ = pieces.rows(
                logits[start:end], labels[start:end], opts, shard, want_entropy=want_entropy
            )
            loss_rows[start:end] = l_
            lse[start:end] = s_
            if want_entropy:
                entropy[start:end] = e_
        valid = labels != opts.ignore_index
        ctx.save_for_backward(logits, labels, lse, valid.sum().clamp_min(1).to(torch.float32))
        ctx.opts, ctx.reduction, ctx.backend, ctx.rows = opts, reduction, backend, rows
        loss = _reduce(loss_rows, valid, reduction)
        if want_entropy:
            ctx.mark_non_differentiable(entropy)
            return loss, entropy
        return loss

    @staticmethod
    def backward(ctx, grad_loss, *unused_grad_entropy):
        logits, labels, lse, count = ctx.saved_tensors
        grad_loss = grad_loss.float()
        scale = grad_loss / count if ctx.reduction == "mean" else grad_loss
        scale = scale.contiguous()
        grad = torch.empty_like(logits)
        pieces = _pieces(ctx.backend)
        shard = VocabShard(0, logits.shape[1])
        for start in range(0, logits.shape[0], ctx.rows):
            end = min(start + ctx.rows, logits.shape[0])
            s = scale if scale.dim() == 0 else scale[start:end]
            x = logits[start:end]
            scratch = None
            if ctx.backend == "torch":  # the caller's logits are not scratch: a z of our own
                scratch = (_capped_fp32(x, ctx.opts, clobber=False), None)
            pieces.grad(
                x,
                scratch,
                labels[start:end],
                lse[start:end],
                ctx.opts,
                shard,
                grad_scale=s,
                grad_out=grad[start:end],
            )
        return grad, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Cross-entropy of ``logits`` [..., V] against ``labels`` [...], with the fused op's options.

    Same definitions and outputs as :func:`fused_linear_cross_entropy` (module docstring); the gradient
    w.r.t. ``logits`` has the logits' dtype. The logits are not modified.
    """
    op = "cross_entropy"
    _check_options(op, reduction, label_smoothing, z_loss, softcap)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"{op}: labels {tuple(labels.shape)} must have logits' leading shape {tuple(logits.shape[:-1])}"
        )
    resolved = resolve_backend(backend, logits.device, op)
    _require_interpreted_on_cpu(resolved, logits.device, op)
    shape = labels.shape
    logits2 = logits.reshape(-1, logits.shape[-1])
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    labels1 = labels.reshape(-1).long().contiguous()
    per_row = chunk_bytes_per_row(logits2.shape[1], 0, logits.dtype, resolved, None, logits_block=False)
    rows = chunk_rows(
        max(1, logits2.shape[0]), per_row, chunk_budget_bytes()
    )  # Triton: no temporaries, all rows
    opts = CEOptions(
        int(ignore_index), float(label_smoothing), float(z_loss), None if softcap is None else float(softcap)
    )
    out = _CrossEntropy.apply(logits2, labels1, opts, reduction, return_entropy, resolved, rows)
    if return_entropy:
        loss, entropy = out
        return (loss.view(shape) if reduction == "none" else loss), entropy.view(shape)
    return out.view(shape) if reduction == "none" else out


# ---------------------------------------------------------------------------------------------------
# nn.Module wrappers.
# ---------------------------------------------------------------------------------------------------


class FusedLinearCrossEntropyLoss(nn.Module):
    """``loss = FusedLinearCrossEntropyLoss(...)(hidden, weight, labels, bias=None)``: see the function."""

    def __init__(
        self,
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
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap = z_loss, softcap
        self.return_entropy, self.backend = return_entropy, backend
        self.grad_accumulation = grad_accumulation

    def forward(self, hidden, weight, labels, bias=None):
        return fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            return_entropy=self.return_entropy,
            backend=self.backend,
            grad_accumulation=self.grad_accumulation,
        )


class CrossEntropyLoss(nn.Module):
    """``loss = CrossEntropyLoss(...)(logits, labels)``: see :func:`cross_entropy`."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_entropy: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        _check_options(type(self).__name__, reduction, label_smoothing, z_loss, softcap)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap = z_loss, softcap
        self.return_entropy, self.backend = return_entropy, backend

    def forward(self, logits, labels):
        return cross_entropy(
            logits,
            labels,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            return_entropy=self.return_entropy,
            backend=self.backend,
        )
