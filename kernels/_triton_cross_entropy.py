"""Triton kernel for the per-row cross-entropy math (definitions: ``cross_entropy.py``).

One program per row streams the row in blocks of BLOCK_V:
  pass 1: online max m, S = sum e^(z-m), T = sum e^(z-m) (z-m) (entropy = log S - T/S, which keeps its
          precision when the entropy is tiny, unlike lse - E[z]), sum z (label smoothing) and z[label];
  pass 2 (gradient wanted): d/dx of loss * scale, written in the output dtype, possibly in place over
          the logits (each block is read before it is written, by the same program).
With a saved lse (the backward of reduction "none", or of ``cross_entropy``), pass 1 is skipped.
Everything is fp32 inside; only the gradient is rounded to the logits' dtype. Uses only Triton APIs
present in 3.6.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .utils import KernelVariant, interpreter_enabled


@triton.jit
def _softcap(x, cap):
    """cap * tanh(x / cap), tanh from exp (portable: no libdevice); returns (z, tanh)."""
    a = x / cap
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(a < 0, -t, t)
    return cap * t, t


@triton.jit
def _ce_kernel(x_ptr, x_stride, labels_ptr, loss_ptr, lse_ptr, ent_ptr, grad_ptr, grad_stride,
               scale_ptr, scale_stride, num_classes, ignore_index, eps, z_loss, cap,
               HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
               WANT_ENTROPY: tl.constexpr, WRITE_GRAD: tl.constexpr, SAVED_LSE: tl.constexpr,
               BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    out_of_range = valid & ((label < 0) | (label >= num_classes))
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    if SAVED_LSE:
        lse = tl.load(lse_ptr + row)
    else:
        m = tl.full((), neg_inf, tl.float32)
        s = tl.zeros((), tl.float32)
        t = tl.zeros((), tl.float32)
        sum_z = tl.zeros((), tl.float32)
        z_label = tl.zeros((), tl.float32)
        for start in range(0, num_classes, BLOCK_V):
            cols = start + offs
            mask = cols < num_classes
            z = tl.load(x_row + cols, mask=mask, other=neg_inf).to(tl.float32)
            if HAS_SOFTCAP:
                z, _ = _softcap(z, cap)
                z = tl.where(mask, z, neg_inf)  # padding maps to -cap, not -inf: mask it again
            m_new = tl.maximum(m, tl.max(z, 0))
            # Guards: a leading all -inf block must not turn the running sums into NaN.
            alpha = tl.where(m_new == neg_inf, 1.0, tl.exp(m - m_new))
            e = tl.where(z == neg_inf, 0.0, tl.exp(z - m_new))
            if WANT_ENTROPY:
                shift = tl.where(m == neg_inf, 0.0, m - m_new)
                t = alpha * (t + shift * s) + tl.sum(e * tl.where(e > 0, z - m_new, 0.0), 0)
            s = s * alpha + tl.sum(e, 0)
            if HAS_SMOOTHING:
                sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
            z_label += tl.sum(tl.where(cols == label, z, 0.0), 0)
            m = m_new
        lse = m + tl.log(s)
        loss = lse - z_label
        if HAS_SMOOTHING:
            loss = (1.0 - eps) * loss + eps * (lse - sum_z / num_classes)
        if HAS_ZLOSS:
            loss += z_loss * lse * lse
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(out_of_range, float("nan"), loss)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        if WANT_ENTROPY:
            entropy = tl.maximum(tl.log(s) - t / s, 0.0)
            tl.store(ent_ptr + row, tl.where(valid, entropy, 0.0))

    if WRITE_GRAD:
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        row_scale = tl.where(valid, scale, 0.0)
        row_scale = tl.where(out_of_range, float("nan"), row_scale)
        coef = 1.0
        if HAS_ZLOSS:
            coef = 1.0 + 2.0 * z_loss * lse
        smooth = 0.0
        if HAS_SMOOTHING:
            smooth = eps / num_classes
        g_row = grad_ptr + row * grad_stride
        for start in range(0, num_classes, BLOCK_V):
            cols = start + offs
            mask = cols < num_classes
            z = tl.load(x_row + cols, mask=mask, other=neg_inf).to(tl.float32)
            if HAS_SOFTCAP:
                z, th = _softcap(z, cap)
            g = tl.exp(z - lse) * coef - smooth
            g = tl.where(cols == label, g - (1.0 - eps), g)
            if HAS_SOFTCAP:
                g = g * (1.0 - th * th)
            g = g * row_scale
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_config(num_classes: int):
    block = triton.next_power_of_2(num_classes)
    if interpreter_enabled():
        return min(block, 4096), 1  # the interpreter pays per loop iteration: few, wide blocks
    return min(block, 4096), 8


def _launch(x, labels, opts, *, loss, lse, entropy, grad_scale, grad_out, saved_lse):
    rows, num_classes = x.shape
    if rows == 0:
        return
    assert x.stride(1) == 1 and labels.is_contiguous()
    write_grad = grad_scale is not None
    if write_grad:
        assert grad_out.stride(1) == 1
        scale = grad_scale.to(device=x.device, dtype=torch.float32).contiguous()
        scale_stride = 0 if scale.dim() == 0 else 1
    else:
        scale, scale_stride, grad_out = lse, 0, x
    block, warps = _launch_config(num_classes)
    _ce_kernel[(rows,)](
        x, x.stride(0), labels, loss if loss is not None else lse, lse,
        entropy if entropy is not None else lse, grad_out, grad_out.stride(0), scale, scale_stride,
        num_classes, opts.ignore_index, float(opts.label_smoothing), float(opts.z_loss),
        float(opts.softcap) if opts.softcap else 1.0,
        HAS_SOFTCAP=bool(opts.softcap), HAS_SMOOTHING=opts.label_smoothing > 0, HAS_ZLOSS=opts.z_loss > 0,
        WANT_ENTROPY=entropy is not None, WRITE_GRAD=write_grad, SAVED_LSE=saved_lse,
        BLOCK_V=block, num_warps=warps)


def ce_rows_triton(x, labels, opts, *, want_entropy, grad_scale=None, grad_out=None):
    """Same contract as ``cross_entropy.ce_rows_torch`` (``grad_out`` may be ``x``)."""
    rows = x.shape[0]
    loss = torch.empty(rows, device=x.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    entropy = torch.empty_like(loss) if want_entropy else None
    _launch(x, labels, opts, loss=loss, lse=lse, entropy=entropy, grad_scale=grad_scale, grad_out=grad_out,
            saved_lse=False)
    return loss, lse, entropy


def ce_rows_backward_triton(x, labels, lse, opts, *, grad_scale, grad_out):
    """Gradient only, from the forward's ``lse``: one pass over the logits."""
    _launch(x, labels, opts, loss=None, lse=lse.contiguous(), entropy=None, grad_scale=grad_scale,
            grad_out=grad_out, saved_lse=True)


# Logits dtypes the fused loss and cross_entropy pass to the kernel (the gradient has the same dtype).
LOGITS_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_variants() -> list[KernelVariant]:
    """The forms of ``_ce_kernel`` that ``_launch`` asks for on a GPU (for tests/test_kernels_compile.py).

    Flags as ``_launch`` derives them: the three options on or off; the forward (``ce_rows_triton``) with or
    without entropy and gradient; the backward from a saved lse (``ce_rows_backward_triton``: gradient, no
    entropy). Block and warps from ``_launch_config`` for a vocabulary of at least 4096 (smaller vocabularies
    launch smaller power-of-two blocks, not listed).
    """
    block, warps = _launch_config(1 << 20)
    flag_sets = [(entropy, grad, False) for entropy in (False, True) for grad in (False, True)]
    flag_sets.append((False, True, True))
    variants = []
    for dtype in LOGITS_DTYPES.values():
        for softcap, smoothing, zloss in itertools.product((False, True), repeat=3):
            for entropy, grad, saved_lse in flag_sets:
                signature = {"x_ptr": f"*{dtype}", "x_stride": "i32", "labels_ptr": "*i64", "loss_ptr": "*fp32",
                             "lse_ptr": "*fp32", "ent_ptr": "*fp32", "grad_ptr": f"*{dtype}", "grad_stride": "i32",
                             "scale_ptr": "*fp32", "scale_stride": "i32", "num_classes": "i32",
                             "ignore_index": "i32", "eps": "fp32", "z_loss": "fp32", "cap": "fp32"}
                constexprs = dict(HAS_SOFTCAP=softcap, HAS_SMOOTHING=smoothing, HAS_ZLOSS=zloss,
                                  WANT_ENTROPY=entropy, WRITE_GRAD=grad, SAVED_LSE=saved_lse, BLOCK_V=block)
                signature.update({name: "constexpr" for name in constexprs})
                flags = ",".join(k.lower() for k, v in constexprs.items() if v is True) or "plain"
                variants.append(KernelVariant(name=f"_ce_kernel[{dtype},{flags}]", kernel=_ce_kernel,
                                              signature=signature, constexprs=constexprs, num_warps=warps))
    return variants
