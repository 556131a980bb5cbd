"""Triton kernel for the per-row cross-entropy math (definitions: ``cross_entropy.py``).

One program per row streams a [rows, row_len] block of logits in blocks of BLOCK_V. The block may be one
vocabulary shard: its columns are the global classes [vocab_start, vocab_start + row_len) of
``num_classes``. MODE (constexpr) says what a program does:

  MODE_LOSS       pass 1: online max m, S = sum e^(z-m), T = sum e^(z-m) (z-m) (entropy = log S - T/S, which
                  keeps its precision when the entropy is tiny, unlike lse - E[z]), sum z (label smoothing)
                  and z[label] -> loss, lse and entropy of the row;
  MODE_LOSS_GRAD  pass 1, then pass 2 in the same program: d/dx of loss * scale from that lse, written in
                  the output dtype, possibly in place over the logits (each block is read before it is
                  written, by the same program);
  MODE_PARTIAL    pass 1 on a vocabulary shard: writes the partials (m, S, T, sum z, z[label]) for the
                  caller to combine across shards (``cross_entropy.PARTIALS`` gives the order);
  MODE_GRAD       pass 2 only, from a given lse (the backward of reduction "none", ``cross_entropy``'s
                  backward, and the vocabulary-parallel op once the partials are combined).

Everything is fp32 inside; only the gradient is rounded to the logits' dtype. Label smoothing and z-loss
are runtime scalars (0 = off: selected with ``tl.where``, so -inf logits cannot turn them into NaN), which
keeps the compiled variants to what changes the code: softcap, entropy and the mode. Every variant the
wrappers launch is listed by ``compile_variants()`` from the tables below (LOGIT_DTYPES, LAUNCHED_MODES,
BLOCK_V, NUM_WARPS), which ``_launch`` also checks. Uses only Triton APIs present in 3.6.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import KernelVariant

MODE_LOSS = tl.constexpr(0)
MODE_LOSS_GRAD = tl.constexpr(1)
MODE_PARTIAL = tl.constexpr(2)
MODE_GRAD = tl.constexpr(3)

# The launch tables: _launch refuses anything else, compile_variants() enumerates exactly these.
BLOCK_V = 4096  # columns per loop iteration (interpreter and GPU alike: few, wide blocks)
NUM_WARPS = 8
LOGIT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LAUNCHED_MODES = (  # (MODE, WANT_ENTROPY)
    (MODE_LOSS.value, False),
    (MODE_LOSS.value, True),
    (MODE_LOSS_GRAD.value, False),
    (MODE_LOSS_GRAD.value, True),
    (MODE_PARTIAL.value, False),
    (MODE_PARTIAL.value, True),
    (MODE_GRAD.value, False),
)
# Argument types of _ce_kernel (positional order); "{x}" is the logits' element type (the gradient's too).
_SIGNATURE = (
    ("x_ptr", "*{x}"),
    ("x_stride", "i32"),
    ("labels_ptr", "*i64"),
    ("out_ptr", "*fp32"),
    ("out_stride", "i32"),
    ("lse_ptr", "*fp32"),
    ("grad_ptr", "*{x}"),
    ("grad_stride", "i32"),
    ("scale_ptr", "*fp32"),
    ("scale_stride", "i32"),
    ("row_len", "i32"),
    ("num_classes", "i32"),
    ("vocab_start", "i32"),
    ("ignore_index", "i32"),
    ("eps", "fp32"),
    ("z_loss", "fp32"),
    ("cap", "fp32"),
)


@triton.jit
def _softcap(x, cap):
    """cap * tanh(x / cap), tanh from exp (portable: no libdevice); returns (z, tanh)."""
    a = x / cap
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(a < 0, -t, t)
    return cap * t, t


@triton.jit
def _ce_kernel(
    x_ptr,
    x_stride,
    labels_ptr,
    out_ptr,
    out_stride,
    lse_ptr,
    grad_ptr,
    grad_stride,
    scale_ptr,
    scale_stride,
    row_len,
    num_classes,
    vocab_start,
    ignore_index,
    eps,
    z_loss,
    cap,
    HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 on large blocks
    x_row = x_ptr + row * x_stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    out_of_range = valid & ((label < 0) | (label >= num_classes))
    target = label - vocab_start  # the label's column in this block; outside [0, row_len) on another shard
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    if MODE == MODE_GRAD:
        lse = tl.load(lse_ptr + row)
    else:
        m = tl.full((), neg_inf, tl.float32)
        s = tl.zeros((), tl.float32)
        t = tl.zeros((), tl.float32)
        sum_z = tl.zeros((), tl.float32)
        z_label = tl.zeros((), tl.float32)
        for start in range(0, row_len, BLOCK_V):
            cols = start + offs
            mask = cols < row_len
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
            sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
            z_label += tl.sum(tl.where((cols == target) & mask, z, 0.0), 0)  # target may be past row_len
            m = m_new
        if MODE == MODE_PARTIAL:
            tl.store(out_ptr + row, m)
            tl.store(out_ptr + out_stride + row, s)
            tl.store(out_ptr + 2 * out_stride + row, t)
            tl.store(out_ptr + 3 * out_stride + row, sum_z)
            tl.store(out_ptr + 4 * out_stride + row, z_label)
        else:
            lse = m + tl.log(s)
            loss = lse - z_label
            loss = tl.where(eps > 0, (1.0 - eps) * loss + eps * (lse - sum_z / num_classes), loss)
            loss = tl.where(z_loss > 0, loss + z_loss * lse * lse, loss)
            loss = tl.where(valid, loss, 0.0)
            loss = tl.where(out_of_range, float("nan"), loss)
            tl.store(out_ptr + row, loss)
            tl.store(out_ptr + out_stride + row, lse)
            if WANT_ENTROPY:
                entropy = tl.maximum(tl.log(s) - t / s, 0.0)
                tl.store(out_ptr + 2 * out_stride + row, tl.where(valid, entropy, 0.0))

    if MODE == MODE_LOSS_GRAD or MODE == MODE_GRAD:
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        row_scale = tl.where(valid, scale, 0.0)
        row_scale = tl.where(out_of_range, float("nan"), row_scale)
        coef = tl.where(z_loss > 0, 1.0 + 2.0 * z_loss * lse, 1.0)
        smooth = eps / num_classes
        g_row = grad_ptr + row * grad_stride
        for start in range(0, row_len, BLOCK_V):
            cols = start + offs
            mask = cols < row_len
            z = tl.load(x_row + cols, mask=mask, other=neg_inf).to(tl.float32)
            if HAS_SOFTCAP:
                z, th = _softcap(z, cap)
            g = tl.exp(z - lse) * coef - smooth
            g = tl.where(cols == target, g - (1.0 - eps), g)
            if HAS_SOFTCAP:
                g = g * (1.0 - th * th)
            g = g * row_scale
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch(
    x, labels, opts, shard, mode, want_entropy, *, out=None, lse=None, grad_scale=None, grad_out=None
):
    """One launch over the rows of ``x``; ``shard`` = (vocab_start, num_classes) of x's columns."""
    rows, row_len = x.shape
    if rows == 0:
        return
    if (mode, want_entropy) not in LAUNCHED_MODES or x.dtype not in LOGIT_DTYPES:
        raise ValueError(
            f"_ce_kernel: no compiled variant for mode {mode}, entropy {want_entropy}, {x.dtype} "
            f"(see LAUNCHED_MODES and LOGIT_DTYPES)"
        )
    assert x.stride(1) == 1 and labels.is_contiguous()
    fp32_dummy = out if out is not None else lse
    if grad_scale is not None:
        assert grad_out.stride(1) == 1 and grad_out.dtype == x.dtype
        scale = grad_scale.to(device=x.device, dtype=torch.float32).contiguous()
        scale_stride = 0 if scale.dim() == 0 else 1
    else:
        scale, scale_stride, grad_out = fp32_dummy, 0, x
    _ce_kernel[(rows,)](
        x,
        x.stride(0),
        labels,
        fp32_dummy if out is None else out,
        0 if out is None else out.stride(0),
        fp32_dummy if lse is None else lse,
        grad_out,
        grad_out.stride(0),
        scale,
        scale_stride,
        row_len,
        shard.num_classes,
        shard.start,
        opts.ignore_index,
        float(opts.label_smoothing),
        float(opts.z_loss),
        float(opts.softcap) if opts.softcap else 1.0,
        HAS_SOFTCAP=bool(opts.softcap),
        WANT_ENTROPY=want_entropy,
        MODE=mode,
        BLOCK_V=BLOCK_V,
        num_warps=NUM_WARPS,
    )


def ce_rows_triton(x, labels, opts, shard, *, want_entropy, grad_scale=None, grad_out=None):
    """Same contract as ``cross_entropy.ce_rows_torch`` (``grad_out`` may be ``x``), in one launch."""
    out = torch.empty(3, x.shape[0], device=x.device, dtype=torch.float32)
    mode = MODE_LOSS.value if grad_scale is None else MODE_LOSS_GRAD.value
    _launch(x, labels, opts, shard, mode, want_entropy, out=out, grad_scale=grad_scale, grad_out=grad_out)
    return out[0], out[1], (out[2] if want_entropy else None)


def ce_partial_triton(x, labels, opts, shard, *, want_entropy):
    """Same contract as ``cross_entropy.ce_partial_torch``; no scratch (the gradient re-reads ``x``)."""
    out = torch.empty(5, x.shape[0], device=x.device, dtype=torch.float32)
    _launch(x, labels, opts, shard, MODE_PARTIAL.value, want_entropy, out=out)  # T = 0 without entropy
    return out, None


def ce_grad_triton(x, scratch, labels, lse, opts, shard, *, grad_scale, grad_out):
    """Same contract as ``cross_entropy.ce_grad_torch``: the gradient from ``lse``, one pass over ``x``."""
    _launch(
        x,
        labels,
        opts,
        shard,
        MODE_GRAD.value,
        False,
        lse=lse.contiguous(),
        grad_scale=grad_scale,
        grad_out=grad_out,
    )


def compile_variants() -> list[KernelVariant]:
    """Every variant of _ce_kernel the wrappers can launch: LOGIT_DTYPES x LAUNCHED_MODES x softcap."""
    variants = []
    for dtype, ty in LOGIT_DTYPES.items():
        signature = {name: kind.format(x=ty) for name, kind in _SIGNATURE}
        for mode, want_entropy in LAUNCHED_MODES:
            for has_softcap in (False, True):
                constexprs = dict(
                    HAS_SOFTCAP=has_softcap, WANT_ENTROPY=want_entropy, MODE=mode, BLOCK_V=BLOCK_V
                )
                name = (
                    f"_ce_kernel[{ty}, mode={mode}{', entropy' if want_entropy else ''}"
                    f"{', softcap' if has_softcap else ''}]"
                )
                variants.append(
                    KernelVariant(
                        name=name,
                        kernel=_ce_kernel,
                        signature={**signature, **{k: "constexpr" for k in constexprs}},
                        constexprs=constexprs,
                        num_warps=NUM_WARPS,
                    )
                )
    return variants
