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

Numerics of the fused op (both backends): the logits of a chunk are computed in the inputs' dtype
(as ``F.linear`` would), everything after that in fp32; the gradient w.r.t. the logits is rounded once
to the inputs' dtype for the two gradient matmuls; the weight (and bias) gradient is accumulated across
chunks in fp32 and rounded once at the end. For reduction "mean"/"sum" the gradients are computed
during the forward pass, chunk by chunk, and only scaled by the incoming gradient in backward (so
``backward`` may run once per forward); for "none" the forward saves lse and the backward recomputes
the logits chunk by chunk.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from .utils import addmm_fp32_, check_interpreted, chunk_rows, downcast_scaled_, resolve_backend

REDUCTIONS = ("mean", "sum", "none")

# Budget for the per-chunk temporaries. The Triton path holds one [rows, V] logits block in the input
# dtype (its gradient is written in place); the torch path holds that block plus ~3 fp32 copies.
# HFDIST_FLCE_CHUNK_MB overrides the budget (for tuning on a new GPU).
_CUDA_BUDGET_BYTES = 512 << 20
_TORCH_BUDGET_BYTES = 96 << 20
_TORCH_BYTES_PER_LOGIT = 14


@dataclass(frozen=True)
class CEOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None


def _check_options(op: str, reduction: str, label_smoothing: float, z_loss: float, softcap) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if float(z_loss) < 0.0:
        raise ValueError(f"{op}: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"{op}: softcap must be > 0 or None, got {softcap}")


# ---------------------------------------------------------------------------------------------------
# Per-row math on one block of logits: the torch reference (the Triton kernels compute the same).
# ---------------------------------------------------------------------------------------------------

def ce_rows_torch(x: torch.Tensor, labels: torch.Tensor, opts: CEOptions, *, want_entropy: bool,
                  grad_scale: torch.Tensor | None = None, grad_out: torch.Tensor | None = None,
                  clobber: bool = False):
    """Loss, lse and entropy (fp32, [rows]) of a [rows, V] block of raw logits ``x``.

    With ``grad_scale`` (fp32, shape [] or [rows]) also writes d(loss_i * grad_scale_i)/dx into
    ``grad_out`` (which may be ``x`` itself). ``clobber`` allows using ``x`` as fp32 scratch.
    """
    num_classes = x.shape[1]
    z = x.float()
    if z.data_ptr() == x.data_ptr() and not clobber:
        z = z.clone()
    if opts.softcap:
        z.div_(opts.softcap).tanh_().mul_(opts.softcap)
    valid = labels != opts.ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    hit = valid & in_range
    target = torch.where(hit, labels, 0)
    lse = torch.logsumexp(z, dim=1)
    loss = lse - z.gather(1, target[:, None]).squeeze(1)
    eps = float(opts.label_smoothing)
    if eps:
        loss = (1.0 - eps) * loss + eps * (lse - z.mean(dim=1))
    if opts.z_loss:
        loss = loss + opts.z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    loss = torch.where(valid & ~in_range, math.nan, loss)

    entropy = None
    if want_entropy or grad_scale is not None:
        p = torch.sub(z, lse[:, None]).exp_()
        if want_entropy:
            z.sub_(lse[:, None])  # log p, in place: a batched dot avoids another [rows, V] temporary
            entropy = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1).neg_().clamp_min_(0.0)
            entropy = torch.where(valid, entropy, 0.0)
            if grad_scale is not None and opts.softcap:
                z.add_(lse[:, None])
        if grad_scale is not None:
            grad = p  # d loss / d z = p * (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == y]
            if opts.z_loss:
                grad.mul_((1.0 + 2.0 * opts.z_loss * lse)[:, None])
            if eps:
                grad.sub_(eps / num_classes)
            grad.scatter_add_(1, target[:, None], (-(1.0 - eps) * hit.float())[:, None])
            if opts.softcap:  # dz/dx = 1 - tanh^2 = 1 - (z / softcap)^2
                grad.mul_(z.div_(opts.softcap).square_().neg_().add_(1.0))
            row_scale = torch.where(valid, grad_scale.float(), 0.0)
            row_scale = torch.where(valid & ~in_range, math.nan, row_scale)
            grad.mul_(row_scale[:, None])
            grad_out.copy_(grad)
    return loss, lse, entropy


def _require_interpreted_on_cpu(resolved: str, device: torch.device, op: str) -> None:
    if resolved == "triton" and device.type == "cpu":
        from . import _triton_cross_entropy as tce
        check_interpreted(tce._ce_kernel, op)


def _ce_rows(backend: str):
    if backend == "torch":
        return ce_rows_torch, None
    from . import _triton_cross_entropy as tce
    return tce.ce_rows_triton, tce.ce_rows_backward_triton


# ---------------------------------------------------------------------------------------------------
# The chunk loop of the fused op.
# ---------------------------------------------------------------------------------------------------

def choose_chunk_rows(num_rows: int, hidden_size: int, vocab_size: int, dtype: torch.dtype, backend: str,
                      device: torch.device) -> int:
    """Rows per chunk: the [rows, V] block (plus the torch path's fp32 temporaries) fits a fixed budget.

    The budget (512 MiB on CUDA, 96 MiB elsewhere) bounds the peak extra memory independently of N;
    with V = 128256 in bf16 that is 2048 rows on CUDA, large enough that each chunk's three matmuls
    (~2 * 6 * rows * H * V flop) dwarf re-reading the weight and the fp32 gradient accumulator.
    ``hidden_size`` only matters through that cost model, which these budgets already satisfy.
    """
    env = os.environ.get("HFDIST_FLCE_CHUNK_MB")
    if env:
        budget = int(float(env) * (1 << 20))
    else:
        budget = _CUDA_BUDGET_BYTES if device.type == "cuda" else _TORCH_BUDGET_BYTES
    per_logit = torch.empty((), dtype=dtype).element_size() if backend == "triton" else _TORCH_BYTES_PER_LOGIT
    return chunk_rows(num_rows, vocab_size, per_logit, budget)


def _run_chunks(hidden, weight, bias, labels, opts, backend, rows, *, want_entropy, need_grads,
                grad_scale=None, saved_lse=None):
    """Loop over row chunks: logits = hidden @ weight.T + bias, then the per-row kernel.

    ``need_grads`` = (hidden, weight, bias). With ``saved_lse`` (backward of reduction "none") the
    kernel uses the forward's lse and returns no loss. Returns loss, lse, entropy, d_hidden, d_weight
    (fp32), d_bias (fp32); entries not asked for are None.
    """
    num_rows = hidden.shape[0]
    vocab = weight.shape[0]
    device = hidden.device
    forward_fn, backward_fn = _ce_rows(backend)
    compute_grad = any(need_grads)
    forward = saved_lse is None
    loss = torch.empty(num_rows, device=device, dtype=torch.float32) if forward else None
    lse = torch.empty(num_rows, device=device, dtype=torch.float32) if forward else None
    entropy = torch.empty(num_rows, device=device, dtype=torch.float32) if want_entropy else None
    d_hidden = torch.empty_like(hidden) if need_grads[0] else None
    d_weight = torch.zeros(weight.shape, device=device, dtype=torch.float32) if need_grads[1] else None
    d_bias = torch.zeros(vocab, device=device, dtype=torch.float32) if need_grads[2] else None
    block = torch.empty(min(rows, num_rows), vocab, device=device, dtype=hidden.dtype)
    weight_t = weight.t()
    for start in range(0, num_rows, rows):
        end = min(start + rows, num_rows)
        h = hidden[start:end]
        x = block[: end - start]
        if bias is None:
            torch.mm(h, weight_t, out=x)
        else:
            torch.addmm(bias, h, weight_t, out=x)
        scale = None
        if compute_grad:
            scale = grad_scale if grad_scale.dim() == 0 else grad_scale[start:end]
        if forward:
            if backend == "torch":
                l_, s_, e_ = forward_fn(x, labels[start:end], opts, want_entropy=want_entropy,
                                        grad_scale=scale, grad_out=x if compute_grad else None, clobber=True)
            else:
                l_, s_, e_ = forward_fn(x, labels[start:end], opts, want_entropy=want_entropy,
                                        grad_scale=scale, grad_out=x if compute_grad else None)
            loss[start:end] = l_
            lse[start:end] = s_
            if want_entropy:
                entropy[start:end] = e_
        elif backend == "torch":
            forward_fn(x, labels[start:end], opts, want_entropy=False, grad_scale=scale, grad_out=x, clobber=True)
        else:
            backward_fn(x, labels[start:end], saved_lse[start:end], opts, grad_scale=scale, grad_out=x)
        if compute_grad:  # x now holds d loss / d logits of this chunk, in the inputs' dtype
            if d_hidden is not None:
                torch.mm(x, weight, out=d_hidden[start:end])
            if d_weight is not None:
                addmm_fp32_(d_weight, x.t(), h)
            if d_bias is not None:
                d_bias += x.sum(dim=0, dtype=torch.float32)
    return loss, lse, entropy, d_hidden, d_weight, d_bias


def _reduce(loss_rows, valid, reduction):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(torch.float32)


def _finish_param_grad(acc, scale, dtype):
    """fp32 accumulator -> gradient in the parameter's dtype, scaled by ``scale`` (one rounding)."""
    if acc is None:
        return None
    if dtype == torch.float32:
        return acc.mul_(scale)
    if torch.empty((), dtype=dtype).element_size() == 2 and acc.is_contiguous():
        return downcast_scaled_(acc, scale, dtype)
    return (acc * scale).to(dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts, reduction, want_entropy, backend, rows):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        valid = labels != opts.ignore_index
        ctx.reduction, ctx.opts, ctx.backend, ctx.rows = reduction, opts, backend, rows
        ctx.need, ctx.used = need, False
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if reduction == "none" or not any(need):
            loss_rows, lse, entropy, *_ = _run_chunks(hidden, weight, bias, labels, opts, backend, rows,
                                                      want_entropy=want_entropy, need_grads=(False,) * 3)
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        else:
            if reduction == "mean":
                scale = 1.0 / valid.sum().clamp_min(1).to(torch.float32)
            else:
                scale = torch.ones((), device=hidden.device, dtype=torch.float32)
            loss_rows, _, entropy, d_h, d_w, d_b = _run_chunks(
                hidden, weight, bias, labels, opts, backend, rows, want_entropy=want_entropy,
                need_grads=need, grad_scale=scale)
            ctx.save_for_backward(d_h, d_w, d_b)
        loss = _reduce(loss_rows, valid, reduction)
        if want_entropy:
            ctx.mark_non_differentiable(entropy)
            return loss, entropy
        return loss

    @staticmethod
    def backward(ctx, grad_loss, *unused_grad_entropy):
        if ctx.used:
            raise RuntimeError("fused_linear_cross_entropy: backward may run only once per forward "
                               "(the gradients are computed in the forward pass and scaled in place)")
        ctx.used = True
        grad_loss = grad_loss.float()
        if ctx.reduction == "none":
            hidden, weight, bias, labels, lse = ctx.saved_tensors
            _, _, _, d_h, d_w, d_b = _run_chunks(hidden, weight, bias, labels, ctx.opts, ctx.backend, ctx.rows,
                                                 want_entropy=False, need_grads=ctx.need,
                                                 grad_scale=grad_loss.contiguous(), saved_lse=lse)
            one = torch.ones((), device=grad_loss.device, dtype=torch.float32)
            d_w = _finish_param_grad(d_w, one, ctx.weight_dtype)
            d_b = _finish_param_grad(d_b, one, ctx.bias_dtype)
        else:
            d_h, d_w, d_b = ctx.saved_tensors
            if d_h is not None:
                d_h = d_h.mul_(grad_loss)
            d_w = _finish_param_grad(d_w, grad_loss, ctx.weight_dtype)
            d_b = _finish_param_grad(d_b, grad_loss, ctx.bias_dtype)
        return d_h, d_w, d_b, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: float | None = None, return_entropy: bool = False,
                               backend: str = "auto", chunk_size: int | None = None):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, without the [N, V] logits.

    ``hidden`` [..., H], ``weight`` [V, H] (the LM head), ``labels`` [...] (hidden's leading shape).
    Returns the loss (fp32; per token, labels' shape, for ``reduction="none"``), and with
    ``return_entropy=True`` also the per-token entropy (fp32, nats, 0 at ignored tokens; not
    differentiated). Differentiable in ``hidden``, ``weight`` and ``bias``. Definitions: module docstring.
    ``chunk_size`` overrides the rows per chunk (default: chosen from N, V and the dtype so that the
    extra memory stays under a fixed budget). No host synchronisation.
    """
    op = "fused_linear_cross_entropy"
    _check_options(op, reduction, label_smoothing, z_loss, softcap)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden [..., H] and weight [V, H] do not match: {tuple(hidden.shape)} vs "
                         f"{tuple(weight.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"{op}: labels {tuple(labels.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"{op}: hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                         f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: labels must be int64 or int32, got {labels.dtype}")
    resolved = resolve_backend(backend, hidden.device, op)
    _require_interpreted_on_cpu(resolved, hidden.device, op)
    shape = labels.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if hidden2.stride(-1) != 1:
        hidden2 = hidden2.contiguous()
    labels1 = labels.reshape(-1).long().contiguous()
    weight_c = weight if weight.is_contiguous() else weight.contiguous()
    rows = int(chunk_size) if chunk_size else choose_chunk_rows(
        hidden2.shape[0], hidden2.shape[1], weight.shape[0], hidden.dtype, resolved, hidden.device)
    opts = CEOptions(int(ignore_index), float(label_smoothing), float(z_loss),
                     None if softcap is None else float(softcap))
    if hidden2.shape[0] == 0:
        zero = hidden2.sum() * 0.0 + weight_c.sum() * 0.0
        loss = labels1.new_zeros(labels1.shape, dtype=torch.float32) if reduction == "none" else zero.float()
        ent = labels1.new_zeros(shape, dtype=torch.float32)
        return (loss.reshape(shape) if reduction == "none" else loss, ent) if return_entropy else loss
    out = _FusedLinearCrossEntropy.apply(hidden2, weight_c, bias, labels1, opts, reduction, return_entropy,
                                         resolved, max(1, rows))
    if return_entropy:
        loss, entropy = out
        return (loss.view(shape) if reduction == "none" else loss), entropy.view(shape)
    return out.view(shape) if reduction == "none" else out


# ---------------------------------------------------------------------------------------------------
# Cross-entropy on given logits.
# ---------------------------------------------------------------------------------------------------

class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, opts, reduction, want_entropy, backend, rows):
        forward_fn, _ = _ce_rows(backend)
        num_rows = logits.shape[0]
        loss_rows = torch.empty(num_rows, device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(loss_rows)
        entropy = torch.empty_like(loss_rows) if want_entropy else None
        for start in range(0, num_rows, rows):  # chunked so that the fp32 temporaries stay bounded
            end = min(start + rows, num_rows)
            l_, s_, e_ = forward_fn(logits[start:end], labels[start:end], opts, want_entropy=want_entropy)
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
        forward_fn, backward_fn = _ce_rows(ctx.backend)
        for start in range(0, logits.shape[0], ctx.rows):
            end = min(start + ctx.rows, logits.shape[0])
            s = scale if scale.dim() == 0 else scale[start:end]
            if ctx.backend == "torch":
                forward_fn(logits[start:end], labels[start:end], ctx.opts, want_entropy=False, grad_scale=s,
                           grad_out=grad[start:end])
            else:
                backward_fn(logits[start:end], labels[start:end], lse[start:end], ctx.opts, grad_scale=s,
                            grad_out=grad[start:end])
        return grad, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                  return_entropy: bool = False, backend: str = "auto"):
    """Cross-entropy of ``logits`` [..., V] against ``labels`` [...], with the fused op's options.

    Same definitions and outputs as :func:`fused_linear_cross_entropy` (module docstring); the gradient
    w.r.t. ``logits`` has the logits' dtype. The logits are not modified.
    """
    op = "cross_entropy"
    _check_options(op, reduction, label_smoothing, z_loss, softcap)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"{op}: labels {tuple(labels.shape)} must have logits' leading shape "
                         f"{tuple(logits.shape[:-1])}")
    resolved = resolve_backend(backend, logits.device, op)
    _require_interpreted_on_cpu(resolved, logits.device, op)
    shape = labels.shape
    logits2 = logits.reshape(-1, logits.shape[-1])
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    labels1 = labels.reshape(-1).long().contiguous()
    if resolved == "torch":
        rows = chunk_rows(max(1, logits2.shape[0]), logits2.shape[1], _TORCH_BYTES_PER_LOGIT, _TORCH_BUDGET_BYTES)
    else:
        rows = max(1, logits2.shape[0])  # the kernel streams each row: no temporaries to bound
    opts = CEOptions(int(ignore_index), float(label_smoothing), float(z_loss),
                     None if softcap is None else float(softcap))
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

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, return_entropy: bool = False,
                 backend: str = "auto"):
        super().__init__()
        _check_options(type(self).__name__, reduction, label_smoothing, z_loss, softcap)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.return_entropy, self.backend = z_loss, softcap, return_entropy, backend

    def forward(self, hidden, weight, labels, bias=None):
        return fused_linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                          reduction=self.reduction, label_smoothing=self.label_smoothing,
                                          z_loss=self.z_loss, softcap=self.softcap,
                                          return_entropy=self.return_entropy, backend=self.backend)


class CrossEntropyLoss(nn.Module):
    """``loss = CrossEntropyLoss(...)(logits, labels)``: see :func:`cross_entropy`."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, return_entropy: bool = False,
                 backend: str = "auto"):
        super().__init__()
        _check_options(type(self).__name__, reduction, label_smoothing, z_loss, softcap)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.return_entropy, self.backend = z_loss, softcap, return_entropy, backend

    def forward(self, logits, labels):
        return cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             return_entropy=self.return_entropy, backend=self.backend)
