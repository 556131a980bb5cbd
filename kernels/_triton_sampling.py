"""Triton sampler: temperature, top-k, top-p, min-p, exact and without sorting (semantics: ``sampling.py``).

Design: three launches, two passes over the logits, each row split over many programs when the batch is
small; the kept set is resolved exactly on a small set of candidates.

  1. ``_chunk_stats_kernel``, grid (B, C): each program reads one chunk of its row (C chunks per row, so
     that B x C fills the GPU: C = 126 at B = 1 on an H100, C = 5 at B = 128) and writes the chunk's
     maximum, its first argmax, a NaN/+inf count and a 128-bin count histogram of z = x / temperature on
     an absolute grid of 1/4 nat (bin = floor(4 z), stored relative to the chunk's top bin).
  2. ``_compact_kernel``, grid (B, C): every program reduces its row's C partial maxima (no launch is
     spent on a reduction), merges the row's C histograms (aligned by their top bins: exact counts per
     1/4-nat bin) and picks the fewest top bins that surely hold what the resolve needs: for top-k the
     bin where the count reaches k (the whole top-k set: top-p's total is its mass), for top-p alone the
     first bin where a lower bound on the head's mass surely holds p of the total (``_choose_bins``).
     It then reads its chunk again, sums the exact integer masses (all of them, and the min-p
     survivors'), and appends the tokens of those bins ((z, index) pairs) to the row's candidate buffer
     (8192 entries; one atomic per block of 1024 for the offset: the buffer's order varies, its content
     does not).
  3. ``_resolve_kernel``, grid (B,): one program per row. Greedy and invalid rows are done. Rows with
     neither top-k nor top-p go to the chunk whose exact min-p mass holds the draw and scan it. Otherwise
     the kept set is computed on the candidates: up to 64 of them by comparing every pair (the definition
     literally: rank, mass ranked before, kept mass up to each index; two rounds); up to 2048, loaded
     once into registers, by 5-way searches (the k-th largest int order key of z by counts, top-p's
     boundary key by masses, its tie group cut at the lowest indices, then the draw by kept mass over
     indices; ~20-30 cheap rounds); more, the same searches streaming the candidates from L1/L2. Every
     quantity is an integer count or mass, so nothing depends on the buffer's order, the split C or the
     rest of the batch. The candidates are checked (top-k: at least k of them; top-p: their mass reaches
     the target); when they do not hold the kept set (more than 8192 tokens needed: near-flat rows with
     large p or k) the searches stream the whole row: exact, but O(V) work per search round.

Cost per call: 2 x B x V x (4 or 2) bytes of logits read, B x C x 0.5 KB of histograms, at most B x 64 KB of
candidates written and read; 3 launches, no host synchronisation (``on_invalid="flag"``). At small B the
launches dominate (capture decoding in a CUDA graph to remove the host's share), at large B the two reads
of the logits; the resolve's work grows with the candidates a row needs (pairs up to 64, register rounds up
to 2048, streamed rounds beyond). The estimates on an H100 against the goals: docs/kernels.md.

Exactness: ``w = exp(z - max z)`` uses libdevice's expf when compiled (the function torch's CUDA exp
calls) and FMA contraction is off, so the integer masses are those of the torch reference on the same
GPU; the interpreter uses numpy's exp, as the CPU reference uses its own. Only Triton APIs present in 3.6.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .utils import (
    MASS_BITS,
    KernelVariant,
    check_interpreted,
    interpreter_enabled,
    inverse_temperature,
)

# Logits dtypes the kernels read as they are (anything else is converted to fp32 first).
LOGITS_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

BLOCK = 1024  # elements per block in the two passes over the logits
RESOLVE_BLOCK = 1024  # candidates (or logits, on the fallback) per block when the resolve streams them
SMALL = 64  # up to this many candidates, the resolve compares all pairs instead of searching
RESIDENT = 2048  # up to this many, the searches run on candidates loaded once into registers
PIVOTS = 4  # pivots per search round (a 5-way split): cheap rounds on register-resident candidates
NBINS = 128  # bins (of width 1/4 in z) of the chunk histograms; bin 127 collects everything below
RELEVANT_BINS = 92  # bins that can hold a token of non-zero mass: w >= 2**-32 means z >= max z - 22.2
MAX_CHUNKS = 256  # programs per row at most (also the block over a row's partials)
MERGE_CHUNKS = 16  # chunk histograms merged per step
CAPACITY = 8192  # candidates per row for the exact resolve
ROW_INFO = 2  # per row: candidate count, chosen bins (-1: no candidates)
PASS_WARPS = 4
RESOLVE_WARPS = 8
# No FMA contraction: z = x * inv_t is rounded before z - max z, as in the torch reference (separate ops).
COMPILE_OPTIONS = {"enable_fp_fusion": False}
PROGRAMS_PER_SM = 4  # split rows until B x C reaches this many programs per SM

_NEG_INF_BITS = tl.constexpr(-8388608)  # int32 bits of fp32 -inf (0xFF800000)
_MINKEY = tl.constexpr(-(2**31) - 1)  # below every int32 order key
_MASS_SCALE = tl.constexpr(float(2**MASS_BITS))
_MASS_MASK = tl.constexpr(2**62 - 1)  # a candidate's stored mass; bit 62 set: it fails min-p
_LIBDEVICE_EXP = tl.constexpr(not interpreter_enabled())  # the interpreter has no libdevice


# ---------------------------------------------------------------------------------------------------
# Helpers (inlined into the kernels).
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _mix32(x):
    """lowbias32 on int64 holding 32-bit values; the multiplies are split so that int64 never overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x352D + (((x * 0x7FEB) & 0xFFFF) << 16)) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0xA68B + (((x * 0x846C) & 0xFFFF) << 16)) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _rand53(key, counter):
    """Same numbers as ``sampling.rand53``."""
    a = _mix32(key ^ _mix32((2 * counter + 0x1B873593) & 0xFFFFFFFF))
    b = _mix32(a ^ key ^ 0x85EBCA6B)
    return ((a >> 11) << 32) | b


@triton.jit
def _scaled(x, inv_t):
    """z = x * inv_t in fp32, -inf kept, -0 made +0 (as ``sampling.scaled_logits``)."""
    z = tl.where(x == float("-inf"), float("-inf"), x * inv_t)
    return tl.where(z == 0.0, 0.0, z)


@triton.jit
def _key(z):
    """int32 order key of fp32 z: monotone, equal keys for equal values."""
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _abin(z):
    """The absolute 1/4-nat bin floor(4 z), clamped to +-1e9 (-inf -> -1e9)."""
    f = tl.floor(z * 4.0)
    return tl.minimum(tl.maximum(f, -1.0e9), 1.0e9).to(tl.int32)


@triton.jit
def _options(
    row,
    inv_t_ptr,
    inv_t_value,
    top_p_ptr,
    top_p_value,
    top_k_ptr,
    top_k_value,
    min_p_ptr,
    min_p_value,
    option_rows,
):
    """The row's options: from the per-row tensors where ``option_rows`` says so, else the scalars."""
    if (option_rows & 1) != 0:
        inv_t = tl.load(inv_t_ptr + row)
    else:
        inv_t = inv_t_value
    if (option_rows & 2) != 0:
        top_p = tl.load(top_p_ptr + row)
    else:
        top_p = top_p_value
    if (option_rows & 4) != 0:
        top_k = tl.load(top_k_ptr + row)
    else:
        top_k = top_k_value.to(tl.int64)
    if (option_rows & 8) != 0:
        min_p = tl.load(min_p_ptr + row)
    else:
        min_p = min_p_value
    return inv_t, top_p, top_k, min_p


@triton.jit
def _block_sums(key, idx, min_ok, q, valid, pivots, kappa_p, iota, k_eff, kappa_k, p_act, MODE: tl.constexpr):
    """One block of a search round. For each pivot v (only tokens of non-zero mass count):
      MODE 0: (count, mass) of the tokens with key >= v;
      MODE 1: (count, 0) of top-p's boundary group (key == kappa_p) with index <= v;
      MODE 2: (mass, 0) of the kept set with index <= v (``min_ok``: the token passes min-p).
    Keys and indices are int32, and so are the pivots: they lie in [lo, hi) of a search interval with
    hi <= 2**31; one at lo = -2**31 - 1 (below every key) becomes -2**31, still at or below every key.
    """
    pivots = tl.maximum(pivots, -2147483648).to(tl.int32)
    if MODE == 0:
        above = valid[:, None] & (key[:, None] >= pivots[None, :])
        first = tl.sum(above.to(tl.int64), 0)
        second = tl.sum(tl.where(above, q[:, None], 0), 0)
    elif MODE == 1:
        below = (valid & (key == kappa_p))[:, None] & (idx[:, None] <= pivots[None, :])
        first = tl.sum(below.to(tl.int64), 0)
        second = first * 0
    else:
        top_k_ok = (key >= kappa_k) | (k_eff == 0)
        top_p_ok = (key > kappa_p) | ((key == kappa_p) & (idx <= iota)) | (p_act == 0)
        kept = valid & top_k_ok & top_p_ok & min_ok
        below = kept[:, None] & (idx[:, None] <= pivots[None, :])
        first = tl.sum(tl.where(below, q[:, None], 0), 0)
        second = first * 0
    return first, second


@triton.jit
def _streamed_sums(
    logits_row,
    cand_z,
    cand_i,
    cand_q,
    n,
    from_row,
    inv_t,
    z_max,
    pivots,
    kappa_p,
    iota,
    k_eff,
    kappa_k,
    p_act,
    min_p,
    MODE: tl.constexpr,
    RBLOCK: tl.constexpr,
    NP: tl.constexpr,
):
    """``_block_sums`` over a source streamed block by block: the row's candidates or the row itself."""
    first = tl.zeros([NP], tl.int64)
    second = tl.zeros([NP], tl.int64)
    for start in range(0, n, RBLOCK):
        offs = start + tl.arange(0, RBLOCK)
        m = offs < n
        if from_row:  # (helpers inlined: the interpreter pays dearly for each nested call)
            x = tl.load(logits_row + offs, mask=m, other=float("-inf")).to(tl.float32)
            z = tl.where(x == float("-inf"), float("-inf"), x * inv_t)
            z = tl.where(z == 0.0, 0.0, z)
            idx = offs.to(tl.int32)
            if _LIBDEVICE_EXP:
                w = libdevice.exp(z - z_max)
            else:
                w = tl.exp(z - z_max)
            q = (w * _MASS_SCALE).to(tl.int64)
            min_ok = w >= min_p
        else:  # the candidates carry their mass and min-p flag: no exp here
            z = tl.load(cand_z + offs, mask=m, other=_NEG_INF_BITS).to(tl.float32, bitcast=True)
            idx = tl.load(cand_i + offs, mask=m, other=0)
            tagged = tl.load(cand_q + offs, mask=m, other=0)
            q = tagged & _MASS_MASK
            min_ok = (tagged >> 62) == 0
        bits = z.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        f, s = _block_sums(
            key, idx, min_ok, q, m & (q > 0), pivots, kappa_p, iota, k_eff, kappa_k, p_act, MODE
        )
        first += f
        second += s
    return first, second


@triton.jit
def _sums(
    key,
    idx,
    min_ok,
    q,
    valid,
    logits_row,
    cand_z,
    cand_i,
    cand_q,
    n,
    from_row,
    inv_t,
    z_max,
    pivots,
    kappa_p,
    iota,
    k_eff,
    kappa_k,
    p_act,
    min_p,
    MODE: tl.constexpr,
    RESIDENT: tl.constexpr,
    RBLOCK: tl.constexpr,
    NP: tl.constexpr,
):
    """A search round: on the candidates held in registers (RESIDENT), or streamed from memory."""
    if RESIDENT:
        first, second = _block_sums(
            key, idx, min_ok, q, valid, pivots, kappa_p, iota, k_eff, kappa_k, p_act, MODE
        )
    else:
        first, second = _streamed_sums(
            logits_row,
            cand_z,
            cand_i,
            cand_q,
            n,
            from_row,
            inv_t,
            z_max,
            pivots,
            kappa_p,
            iota,
            k_eff,
            kappa_k,
            p_act,
            min_p,
            MODE,
            RBLOCK,
            NP,
        )
    return first, second


@triton.jit
def _candidate_entries(cand_z, cand_i, cand_q, offs, n):
    """Candidates at ``offs`` (< n): (int32 order key, int32 index, passes min-p, int64 mass q, valid)."""
    m = offs < n
    z = tl.load(cand_z + offs, mask=m, other=_NEG_INF_BITS).to(tl.float32, bitcast=True)
    idx = tl.load(cand_i + offs, mask=m, other=0)
    tagged = tl.load(cand_q + offs, mask=m, other=0)
    q = tagged & _MASS_MASK
    return _key(z), idx, (tagged >> 62) == 0, q, m & (q > 0)


@triton.jit
def _candidate_mass(cand_z, cand_i, cand_q, n, RBLOCK: tl.constexpr):
    """The total integer mass of the candidates."""
    total = tl.zeros((), tl.int64)
    for start in range(0, n, RBLOCK):
        offs = start + tl.arange(0, RBLOCK)
        total += tl.sum(tl.load(cand_q + offs, mask=offs < n, other=0) & _MASS_MASK, 0)
    return total


@triton.jit
def _choose_bins(
    counts, top, z_max, top_k, k_act, top_p, p_act, capacity, NBINS: tl.constexpr, RELEVANT_BINS: tl.constexpr
):
    """How many top bins (minus one) surely hold what the resolve needs; -1 for none (too many tokens).

    ``counts[j]``: the row's tokens with floor(4 z) == top - j; their weights lie in
    [exp((top - j) / 4 - z_max), exp((top - j + 1) / 4 - z_max)], which bounds each bin's mass. Top-k
    needs the whole top-k set (top-p's total is its mass): the bin where the count reaches k. Top-p alone
    needs the first bin j where the head surely holds p of the mass: (1 - p) * head_lo(j) >= p * tail_hi(j)
    (a head_lo / tail_hi ratio test, so bins' looseness costs a few extra bins, never all of them). The
    choice only decides speed: the resolve checks that the candidates hold the kept set.
    """
    j = tl.arange(0, NBINS)
    n = tl.where(j < RELEVANT_BINS, counts, 0)
    cum = tl.cumsum(n, 0)
    edge = (top - j).to(tl.float32) * 0.25
    nf = n.to(tl.float32)
    head_lo = tl.cumsum(nf * tl.exp(tl.minimum(edge - z_max, 0.0)), 0)
    head_hi = tl.cumsum(nf * tl.exp(tl.minimum(edge + 0.25 - z_max, 0.0)), 0)
    tail_hi = tl.max(head_hi, 0) - head_hi
    has_k = k_act & (tl.sum(n, 0).to(tl.int64) >= top_k)
    j_k = tl.min(tl.where(cum.to(tl.int64) >= top_k, j, NBINS), 0)
    surely = (1.0 - top_p) * head_lo >= top_p * tail_hi * 1.001 + 1e-6
    j_p = tl.min(tl.where((j < RELEVANT_BINS) & surely, j, RELEVANT_BINS - 1), 0)
    chosen = tl.where(has_k, j_k, tl.where(p_act, j_p, -1))
    size = tl.sum(tl.where(j <= chosen, n, 0), 0)
    return tl.where((chosen >= 0) & (size <= capacity), chosen, -1)


@triton.jit
def _draw_by_chunks(
    x_row, num_classes, chunk, num_chunks, part_minp, cs, inv_t, z_max, min_p, r, RBLOCK: tl.constexpr
):
    """No top-k/top-p: the chunk whose exact min-p mass holds the draw, then one scan of that chunk."""
    total = tl.sum(part_minp, 0)
    u = (r.to(tl.float64) * 1.1102230246251565e-16 * total.to(tl.float64)).to(tl.int64)  # floor(r 2^-53 Q)
    cumulative = tl.cumsum(part_minp, 0)
    c_star = tl.min(tl.where((cumulative > u) & (cs < num_chunks), cs, num_chunks - 1), 0)
    running = tl.sum(tl.where(cs == c_star, cumulative - part_minp, 0), 0)
    begin = c_star.to(tl.int64) * chunk
    end = tl.minimum(begin + chunk, num_classes)
    pick = num_classes.to(tl.int64) - 1  # unreachable guard: u < Q, so the scan always stops
    found = tl.zeros((), tl.int32)
    for start in range(begin, end, RBLOCK):
        cols = start + tl.arange(0, RBLOCK)
        mask = cols < end
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        z = tl.where(x == float("-inf"), float("-inf"), x * inv_t)  # _scaled and _exp, inlined
        if _LIBDEVICE_EXP:
            w = libdevice.exp(z - z_max)
        else:
            w = tl.exp(z - z_max)
        q = (w * _MASS_SCALE).to(tl.int64)
        q = tl.where(mask & (q > 0) & (w >= min_p), q, 0)
        first = tl.min(tl.where(running + tl.cumsum(q, 0) > u, cols, end), 0)
        take = (found == 0) & (first < end)
        pick = tl.where(take, first.to(tl.int64), pick)
        found = tl.where(take, 1, found)
        running += tl.sum(q, 0)
    return pick


# ---------------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------------


# Integer arguments that can be 1 are not specialised (Triton would otherwise compile a variant with the
# value folded in, beyond those `compile_variants` lists). `stride`, `num_classes` and `chunk` keep
# Triton's divisibility-by-16 specialisation, which vectorises the loads of the logits.
@triton.jit(
    do_not_specialize=[
        "num_chunks",
        "off_max",
        "off_idx",
        "off_bad",
        "off_hist",
        "off_info",
        "top_k_value",
        "option_rows",
    ]
)
def _chunk_stats_kernel(
    logits_ptr,
    stride,
    num_classes,
    chunk,
    num_chunks,
    ws32_ptr,
    ws64_ptr,
    off_max,
    off_idx,
    off_bad,
    off_hist,
    off_info,
    inv_t_ptr,
    inv_t_value,
    top_p_ptr,
    top_p_value,
    top_k_ptr,
    top_k_value,
    min_p_ptr,
    min_p_value,
    option_rows,
    BLOCK: tl.constexpr,
    NBINS: tl.constexpr,
    ROW_INFO: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    slot = row * num_chunks + c
    inv_t, top_p, top_k, min_p = _options(
        row,
        inv_t_ptr,
        inv_t_value,
        top_p_ptr,
        top_p_value,
        top_k_ptr,
        top_k_value,
        min_p_ptr,
        min_p_value,
        option_rows,
    )
    # Only rows that sample with top-k or top-p need the histogram.
    binned = (inv_t > 0.0) & (top_k != 1) & (((top_k > 0) & (top_k < num_classes)) | (top_p < 1.0))
    x_row = logits_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, NBINS)
    hist_ptr = ws32_ptr + off_hist + slot * NBINS
    hist = tl.zeros([NBINS], tl.int32)
    top_bin = tl.full((), -2000000000, tl.int32)  # below every clamped bin: nothing counted yet
    n_bad = tl.zeros((), tl.int32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int32)
    begin = c * chunk
    end = tl.minimum(begin + chunk, num_classes)
    for start in range(begin, end, BLOCK):
        cols = start + offs
        mask = cols < end
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        n_bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), 0)
        block_max = tl.max(x, 0)
        block_idx = tl.min(tl.where(x == block_max, cols, 2147483647), 0)
        take = block_max > best
        best_idx = tl.where(take, block_idx, best_idx)
        best = tl.where(take, block_max, best)
        if binned:  # (helpers inlined in the loops: the interpreter pays dearly for each nested call)
            z = tl.where(x == float("-inf"), float("-inf"), x * inv_t)
            z = tl.where(z == z, z, float("-inf"))  # NaN rows are invalid: keep their bins finite
            z_bin = tl.minimum(tl.maximum(tl.floor(z * 4.0), -1.0e9), 1.0e9).to(tl.int32)  # _abin(z)
            block_top = tl.max(z_bin, 0)
            if block_top > top_bin:
                if top_bin > -2000000000:  # re-anchor the counts on the new top bin (rare)
                    tl.store(hist_ptr + bins, hist)
                    tl.debug_barrier()
                    src = bins - (block_top - top_bin)
                    hist = tl.load(hist_ptr + src, mask=src >= 0, other=0)
                    tl.debug_barrier()
                top_bin = block_top
            hist += tl.histogram(tl.minimum(top_bin - z_bin, NBINS - 1), NBINS)
    tl.store(ws32_ptr + off_max + slot, best.to(tl.int32, bitcast=True))
    tl.store(ws32_ptr + off_idx + slot, best_idx)
    tl.store(ws32_ptr + off_bad + slot, n_bad)
    if binned:
        tl.store(hist_ptr + bins, hist)
    if c == 0:  # the row's candidate counter, read by pass 2 (a later launch)
        tl.store(
            ws64_ptr + off_info + row * ROW_INFO + tl.arange(0, ROW_INFO), tl.zeros([ROW_INFO], tl.int64)
        )


@triton.jit(
    do_not_specialize=[
        "num_chunks",
        "capacity",
        "off_max",
        "off_bad",
        "off_hist",
        "off_info",
        "off_sums",
        "off_cand_z",
        "off_cand_i",
        "off_cand_q",
        "sums_stride",
        "top_k_value",
        "option_rows",
    ]
)
def _compact_kernel(
    logits_ptr,
    stride,
    num_classes,
    chunk,
    num_chunks,
    capacity,
    ws32_ptr,
    ws64_ptr,
    off_max,
    off_bad,
    off_hist,
    off_info,
    off_sums,
    off_cand_z,
    off_cand_i,
    off_cand_q,
    sums_stride,
    inv_t_ptr,
    inv_t_value,
    top_p_ptr,
    top_p_value,
    top_k_ptr,
    top_k_value,
    min_p_ptr,
    min_p_value,
    option_rows,
    BLOCK: tl.constexpr,
    NBINS: tl.constexpr,
    RELEVANT_BINS: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
    MERGE_CHUNKS: tl.constexpr,
    ROW_INFO: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    inv_t, top_p, top_k, min_p = _options(
        row,
        inv_t_ptr,
        inv_t_value,
        top_p_ptr,
        top_p_value,
        top_k_ptr,
        top_k_value,
        min_p_ptr,
        min_p_value,
        option_rows,
    )
    parts = row * num_chunks
    cs = tl.arange(0, MAX_CHUNKS)
    cm = cs < num_chunks
    part_max = tl.load(ws32_ptr + off_max + parts + cs, mask=cm, other=_NEG_INF_BITS).to(
        tl.float32, bitcast=True
    )
    n_bad = tl.sum(tl.load(ws32_ptr + off_bad + parts + cs, mask=cm, other=0), 0)
    best = tl.max(part_max, 0)
    sampled = (n_bad == 0) & (best > float("-inf")) & (inv_t > 0.0) & (top_k != 1)
    mass_all = tl.zeros((), tl.int64)
    mass_minp = tl.zeros((), tl.int64)
    count_c = tl.zeros((), tl.int64)
    if sampled:
        z_max = _scaled(best, inv_t)
        min_p = tl.minimum(min_p, 1.0)
        k_act = (top_k > 0) & (top_k < num_classes)
        p_act = top_p < 1.0
        top = _abin(z_max)
        chosen = tl.full((), -1, tl.int32)
        if k_act | p_act:
            # The row's histogram: each chunk's counts shifted by its top bin's distance to the row's.
            bins = tl.arange(0, NBINS)
            counts = tl.zeros([NBINS], tl.int32)
            for c0 in range(0, num_chunks, MERGE_CHUNKS):
                cc = c0 + tl.arange(0, MERGE_CHUNKS)
                ccm = cc < num_chunks
                m_c = tl.load(ws32_ptr + off_max + parts + cc, mask=ccm, other=_NEG_INF_BITS)
                shift = top - _abin(_scaled(m_c.to(tl.float32, bitcast=True), inv_t))
                src = bins[None, :] - shift[:, None]
                h = tl.load(
                    ws32_ptr + off_hist + (parts + cc)[:, None] * NBINS + src,
                    mask=ccm[:, None] & (src >= 0) & (src < NBINS - 1),
                    other=0,
                )
                counts += tl.sum(h, 0)
            chosen = _choose_bins(
                counts, top, z_max, top_k, k_act, top_p, p_act, capacity, NBINS, RELEVANT_BINS
            )
            if c == 0:
                tl.store(ws64_ptr + off_info + row * ROW_INFO + 1, chosen.to(tl.int64))
        lowest = top - chosen
        x_row = logits_ptr + row * stride
        offs = tl.arange(0, BLOCK)
        begin = c * chunk
        end = tl.minimum(begin + chunk, num_classes)
        cand_z = ws32_ptr + off_cand_z + row * capacity
        cand_i = ws32_ptr + off_cand_i + row * capacity
        cand_q = ws64_ptr + off_cand_q + row * capacity
        for start in range(begin, end, BLOCK):
            cols = start + offs
            mask = cols < end
            x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            z = tl.where(x == float("-inf"), float("-inf"), x * inv_t)  # _scaled, inlined
            z = tl.where(z == 0.0, 0.0, z)
            if _LIBDEVICE_EXP:  # _exp, inlined
                w = libdevice.exp(z - z_max)
            else:
                w = tl.exp(z - z_max)
            q = (w * _MASS_SCALE).to(tl.int64)
            in_c = mask & (q > 0)
            mass_all += tl.sum(tl.where(in_c, q, 0), 0)
            mass_minp += tl.sum(tl.where(in_c & (w >= min_p), q, 0), 0)
            count_c += tl.sum(in_c.to(tl.int64), 0)
            if chosen >= 0:
                z_bin = tl.minimum(tl.maximum(tl.floor(z * 4.0), -1.0e9), 1.0e9).to(tl.int32)  # _abin(z)
                member = (in_c & (z_bin >= lowest)).to(tl.int32)
                n = tl.sum(member, 0)
                if n > 0:
                    base = tl.atomic_add(ws64_ptr + off_info + row * ROW_INFO, n.to(tl.int64), sem="relaxed")
                    at = base + (tl.cumsum(member, 0) - member).to(tl.int64)
                    keep = (member != 0) & (at < capacity)
                    tl.store(cand_z + at, z.to(tl.int32, bitcast=True), mask=keep)
                    tl.store(cand_i + at, cols, mask=keep)
                    tl.store(
                        cand_q + at, tl.where(w >= min_p, q, q | (1 << 62)), mask=keep
                    )  # mass, min-p flag
    slot = ws64_ptr + off_sums + parts + c
    tl.store(slot, mass_all)
    tl.store(slot + sums_stride, mass_minp)
    tl.store(slot + 2 * sums_stride, count_c)


@triton.jit(
    do_not_specialize=[
        "num_chunks",
        "capacity",
        "off_max",
        "off_idx",
        "off_bad",
        "off_info",
        "off_sums",
        "off_cand_z",
        "off_cand_i",
        "off_cand_q",
        "sums_stride",
        "small_limit",
        "top_k_value",
        "option_rows",
    ]
)
def _resolve_kernel(
    logits_ptr,
    stride,
    num_classes,
    chunk,
    num_chunks,
    capacity,
    ws32_ptr,
    ws64_ptr,
    off_max,
    off_idx,
    off_bad,
    off_info,
    off_sums,
    off_cand_z,
    off_cand_i,
    off_cand_q,
    sums_stride,
    small_limit,
    seeds_ptr,
    tokens_ptr,
    status_ptr,
    inv_t_ptr,
    inv_t_value,
    top_p_ptr,
    top_p_value,
    top_k_ptr,
    top_k_value,
    min_p_ptr,
    min_p_value,
    option_rows,
    RBLOCK: tl.constexpr,
    SMALL: tl.constexpr,
    RESIDENT: tl.constexpr,
    PIVOTS: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
    ROW_INFO: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t, top_p, top_k, min_p = _options(
        row,
        inv_t_ptr,
        inv_t_value,
        top_p_ptr,
        top_p_value,
        top_k_ptr,
        top_k_value,
        min_p_ptr,
        min_p_value,
        option_rows,
    )
    parts = row * num_chunks
    cs = tl.arange(0, MAX_CHUNKS)
    cm = cs < num_chunks
    part_max = tl.load(ws32_ptr + off_max + parts + cs, mask=cm, other=_NEG_INF_BITS).to(
        tl.float32, bitcast=True
    )
    part_idx = tl.load(ws32_ptr + off_idx + parts + cs, mask=cm, other=2147483647)
    n_bad = tl.sum(tl.load(ws32_ptr + off_bad + parts + cs, mask=cm, other=0), 0)
    best = tl.max(part_max, 0)
    best_idx = tl.min(tl.where(cm & (part_max == best), part_idx, 2147483647), 0)
    invalid = (n_bad > 0) | (best == float("-inf"))
    token = tl.where(invalid, -1, best_idx.to(tl.int64))  # greedy: the first argmax
    if (~invalid) & (inv_t > 0.0) & (top_k != 1):
        z_max = _scaled(best, inv_t)
        min_p = tl.minimum(min_p, 1.0)
        x_row = logits_ptr + row * stride
        sums = ws64_ptr + off_sums + parts + cs
        mass_all = tl.sum(tl.load(sums, mask=cm, other=0), 0)
        part_minp = tl.load(sums + sums_stride, mask=cm, other=0)
        count_c = tl.sum(tl.load(sums + 2 * sums_stride, mask=cm, other=0), 0)
        seed = tl.load(seeds_ptr + row)
        stream = _mix32(_mix32((seed & 0xFFFFFFFF) ^ 0x3C6EF372) ^ ((seed >> 32) & 0xFFFFFFFF))
        r = _rand53(stream, tl.zeros((), tl.int64))  # counter 0: the reference's number
        p_act = top_p < 1.0
        # Top-k that keeps every token of non-zero mass cuts nothing that can be drawn: off.
        k_eff = (top_k > 0) & (top_k < num_classes) & (top_k < count_c)
        if k_eff | p_act:
            info = ws64_ptr + off_info + row * ROW_INFO
            token = _resolve_filtered(
                x_row,
                num_classes,
                ws32_ptr + off_cand_z + row * capacity,
                ws32_ptr + off_cand_i + row * capacity,
                ws64_ptr + off_cand_q + row * capacity,
                tl.load(info),
                tl.load(info + 1),
                inv_t,
                z_max,
                top_p,
                top_k,
                min_p,
                k_eff,
                p_act,
                mass_all,
                r,
                small_limit,
                SMALL,
                RESIDENT,
                RBLOCK,
                PIVOTS,
            )
        else:
            token = _draw_by_chunks(
                x_row, num_classes, chunk, num_chunks, part_minp, cs, inv_t, z_max, min_p, r, RBLOCK
            )
    tl.store(tokens_ptr + row, token)
    tl.store(status_ptr + row, invalid.to(tl.int32))


@triton.jit
def _resolve_filtered(
    x_row,
    num_classes,
    cand_z,
    cand_i,
    cand_q,
    n_cand,
    chosen,
    inv_t,
    z_max,
    top_p,
    top_k,
    min_p,
    k_eff,
    p_act,
    mass_all,
    r,
    small_limit,
    SMALL: tl.constexpr,
    RESIDENT: tl.constexpr,
    RBLOCK: tl.constexpr,
    PIVOTS: tl.constexpr,
):
    """The exact kept set (top-k, top-p, min-p) and the draw, on the candidates or (fallback) the whole row.

    Candidates hold the kept set when there are at least k of them (top-k: its whole set, which is top-p's
    total too), or (top-p alone) when their mass reaches the target of the row's exact total.
    """
    from_row = (chosen < 0) | (k_eff & (n_cand < top_k))
    if (from_row == 0) & (k_eff == 0):
        exact = top_p.to(tl.float64) * mass_all.to(tl.float64)
        target = exact.to(tl.int64)
        target = tl.maximum(tl.where(target.to(tl.float64) < exact, target + 1, target), 1)
        from_row = _candidate_mass(cand_z, cand_i, cand_q, n_cand, RBLOCK) < target
    # The candidates are the tokens with floor(4 z) >= top - chosen, i.e. z >= (top - chosen) / 4: a lower
    # bound on their keys where that quarter is exact in fp32.
    top = _abin(z_max)
    edge = (top - chosen.to(tl.int32)).to(tl.float32) * 0.25
    exact_edge = (top < 4194304) & (top > -4194304) & (from_row == 0)
    lowest = tl.where(exact_edge, _key(edge).to(tl.int64), _MINKEY)
    if (from_row == 0) & (n_cand <= small_limit):
        token = _resolve_small(
            cand_z,
            cand_i,
            cand_q,
            n_cand,
            z_max,
            top_p,
            top_k,
            min_p,
            k_eff,
            p_act,
            mass_all,
            r,
            num_classes,
            SMALL,
        )
    elif (from_row == 0) & (n_cand <= RESIDENT):  # load once, search in registers
        key, idx, min_ok, q, valid = _candidate_entries(
            cand_z, cand_i, cand_q, tl.arange(0, RESIDENT), n_cand
        )
        token = _searches(
            key,
            idx,
            min_ok,
            q,
            valid,
            x_row,
            num_classes,
            cand_z,
            cand_i,
            cand_q,
            n_cand,
            from_row,
            lowest,
            inv_t,
            z_max,
            top_p,
            top_k,
            min_p,
            k_eff,
            p_act,
            mass_all,
            r,
            True,
            RBLOCK,
            PIVOTS,
        )
    else:  # stream the candidates, or the row, through every round
        n = tl.where(from_row, num_classes.to(tl.int64), n_cand)
        token = _searches(
            z_max,
            z_max,
            z_max,
            z_max,
            z_max,
            x_row,
            num_classes,
            cand_z,
            cand_i,
            cand_q,
            n,
            from_row,
            lowest,
            inv_t,
            z_max,
            top_p,
            top_k,
            min_p,
            k_eff,
            p_act,
            mass_all,
            r,
            False,
            RBLOCK,
            PIVOTS,
        )
    return token


@triton.jit
def _resolve_small(
    cand_z,
    cand_i,
    cand_q,
    n,
    z_max,
    top_p,
    top_k,
    min_p,
    k_eff,
    p_act,
    mass_all,
    r,
    num_classes,
    SMALL: tl.constexpr,
):
    """At most SMALL candidates: the reference's definition literally, comparing every pair; two rounds."""
    key, idx, min_ok, q, valid = _candidate_entries(cand_z, cand_i, cand_q, tl.arange(0, SMALL), n)
    q = tl.where(valid, q, 0)
    # [i, j]: candidate j ranks before candidate i (key descending, then index ascending).
    above = valid[None, :] & (key[None, :] > key[:, None])
    before = above | (valid[None, :] & (key[None, :] == key[:, None]) & (idx[None, :] < idx[:, None]))
    in_top_k = valid & ((k_eff == 0) | (tl.sum(above.to(tl.int32), 1) < top_k))
    mass_k = tl.where(k_eff, tl.sum(tl.where(in_top_k, q, 0), 0), mass_all)
    exact = top_p.to(tl.float64) * mass_k.to(tl.float64)
    target = exact.to(tl.int64)
    target = tl.maximum(tl.where(target.to(tl.float64) < exact, target + 1, target), 1)  # max(1, ceil)
    mass_before = tl.sum(tl.where(before, q[None, :], 0), 1)
    kept = in_top_k & ((p_act == 0) | (mass_before < target)) & min_ok
    q = tl.where(kept, q, 0)
    u = (r.to(tl.float64) * 1.1102230246251565e-16 * tl.sum(q, 0).to(tl.float64)).to(tl.int64)
    running = tl.sum(tl.where(idx[None, :] <= idx[:, None], q[None, :], 0), 1)  # kept mass up to each index
    return tl.min(tl.where(kept & (running > u), idx, num_classes), 0).to(tl.int64)


@triton.jit
def _searches(
    key,
    idx,
    min_ok,
    q,
    valid,
    x_row,
    num_classes,
    cand_z,
    cand_i,
    cand_q,
    n,
    from_row,
    lowest,
    inv_t,
    z_max,
    top_p,
    top_k,
    min_p,
    k_eff,
    p_act,
    mass_all,
    r,
    RESIDENT: tl.constexpr,
    RBLOCK: tl.constexpr,
    NP: tl.constexpr,
):
    """The kept set and the draw by searches: each round splits an interval (lo, hi), predicate true at
    lo and false at hi, at NP points (one pass over the source)."""
    key_top = _key(z_max).to(tl.int64) + 1  # above every key
    piv = tl.arange(0, NP).to(tl.int64)
    kappa_k = tl.full((), _MINKEY, tl.int64)  # top-k keeps key >= kappa_k
    kappa_p = tl.full((), _MINKEY, tl.int64)  # top-p keeps key > kappa_p, and key == kappa_p up to index iota
    iota = num_classes.to(tl.int64)

    # Top-k: kappa_k = the largest key with #(key >= kappa_k) >= k; mass_k = the mass of that set.
    mass_k = mass_all
    if k_eff:
        lo = lowest
        hi = key_top
        while hi - lo > 1:
            pivots = lo + ((hi - lo) * (piv + 1)) // (NP + 1)
            count, mass = _sums(
                key,
                idx,
                min_ok,
                q,
                valid,
                x_row,
                cand_z,
                cand_i,
                cand_q,
                n,
                from_row,
                inv_t,
                z_max,
                pivots,
                kappa_p,
                iota,
                k_eff,
                kappa_k,
                p_act,
                min_p,
                0,
                RESIDENT,
                RBLOCK,
                NP,
            )
            ok = count >= top_k
            new_lo = tl.max(tl.where(ok, pivots, lo), 0)
            hi = tl.min(tl.where(ok, hi, pivots), 0)
            lo = new_lo
        kappa_k = lo
        count, mass = _sums(
            key,
            idx,
            min_ok,
            q,
            valid,
            x_row,
            cand_z,
            cand_i,
            cand_q,
            n,
            from_row,
            inv_t,
            z_max,
            piv * 0 + kappa_k,
            kappa_p,
            iota,
            k_eff,
            kappa_k,
            p_act,
            min_p,
            0,
            RESIDENT,
            RBLOCK,
            NP,
        )
        mass_k = tl.max(mass, 0)

    # Top-p: the shortest prefix of the order (key descending, index ascending) whose mass reaches T.
    if p_act:
        exact = top_p.to(tl.float64) * mass_k.to(tl.float64)
        target = exact.to(tl.int64)
        target = tl.maximum(tl.where(target.to(tl.float64) < exact, target + 1, target), 1)  # max(1, ceil)
        lo = tl.where(k_eff, kappa_k, lowest)
        hi = key_top
        while hi - lo > 1:
            pivots = lo + ((hi - lo) * (piv + 1)) // (NP + 1)
            count, mass = _sums(
                key,
                idx,
                min_ok,
                q,
                valid,
                x_row,
                cand_z,
                cand_i,
                cand_q,
                n,
                from_row,
                inv_t,
                z_max,
                pivots,
                kappa_p,
                iota,
                k_eff,
                kappa_k,
                p_act,
                min_p,
                0,
                RESIDENT,
                RBLOCK,
                NP,
            )
            ok = mass >= target
            new_lo = tl.max(tl.where(ok, pivots, lo), 0)
            hi = tl.min(tl.where(ok, hi, pivots), 0)
            lo = new_lo
        kappa_p = lo
        # The boundary key's tie group (equal masses): its lowest indices, as many as the target needs.
        count, mass = _sums(
            key,
            idx,
            min_ok,
            q,
            valid,
            x_row,
            cand_z,
            cand_i,
            cand_q,
            n,
            from_row,
            inv_t,
            z_max,
            tl.where(piv == 0, kappa_p, kappa_p + 1),
            kappa_p,
            iota,
            k_eff,
            kappa_k,
            p_act,
            min_p,
            0,
            RESIDENT,
            RBLOCK,
            NP,
        )
        group = tl.sum(tl.where(piv == 0, count, 0), 0) - tl.sum(tl.where(piv == 1, count, 0), 0)
        mass_above = tl.sum(tl.where(piv == 1, mass, 0), 0)
        q_each = (tl.sum(tl.where(piv == 0, mass, 0), 0) - mass_above) // tl.maximum(group, 1)
        need = (target - mass_above + q_each - 1) // tl.maximum(q_each, 1)
        if need < group:
            lo = tl.full((), -1, tl.int64)
            hi = num_classes.to(tl.int64) - 1
            while hi - lo > 1:
                pivots = lo + ((hi - lo) * (piv + 1)) // (NP + 1)
                in_group, unused = _sums(
                    key,
                    idx,
                    min_ok,
                    q,
                    valid,
                    x_row,
                    cand_z,
                    cand_i,
                    cand_q,
                    n,
                    from_row,
                    inv_t,
                    z_max,
                    pivots,
                    kappa_p,
                    iota,
                    k_eff,
                    kappa_k,
                    p_act,
                    min_p,
                    1,
                    RESIDENT,
                    RBLOCK,
                    NP,
                )
                ok = in_group >= need
                new_hi = tl.min(tl.where(ok, pivots, hi), 0)
                lo = tl.max(tl.where(ok, lo, pivots), 0)
                hi = new_hi
            iota = hi

    # The draw: the first index whose running kept mass exceeds u = floor(r 2^-53 Q_K).
    kept_mass, unused = _sums(
        key,
        idx,
        min_ok,
        q,
        valid,
        x_row,
        cand_z,
        cand_i,
        cand_q,
        n,
        from_row,
        inv_t,
        z_max,
        piv * 0 + num_classes,
        kappa_p,
        iota,
        k_eff,
        kappa_k,
        p_act,
        min_p,
        2,
        RESIDENT,
        RBLOCK,
        NP,
    )
    u = (r.to(tl.float64) * 1.1102230246251565e-16 * tl.max(kept_mass, 0).to(tl.float64)).to(tl.int64)
    lo = tl.full((), -1, tl.int64)
    hi = num_classes.to(tl.int64) - 1
    while hi - lo > 1:
        pivots = lo + ((hi - lo) * (piv + 1)) // (NP + 1)
        kept_below, unused = _sums(
            key,
            idx,
            min_ok,
            q,
            valid,
            x_row,
            cand_z,
            cand_i,
            cand_q,
            n,
            from_row,
            inv_t,
            z_max,
            pivots,
            kappa_p,
            iota,
            k_eff,
            kappa_k,
            p_act,
            min_p,
            2,
            RESIDENT,
            RBLOCK,
            NP,
        )
        ok = kept_below > u
        new_hi = tl.min(tl.where(ok, pivots, hi), 0)
        lo = tl.max(tl.where(ok, lo, pivots), 0)
        hi = new_hi
    return hi


# ---------------------------------------------------------------------------------------------------
# Launch.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """How a call is split. ``block``/``resolve_block``/``resident`` may differ from the compiled defaults only
    in the interpreter (tests use small blocks to run many blocks and programs per row on small shapes)."""

    block: int = BLOCK
    resolve_block: int = RESOLVE_BLOCK
    resident: int = RESIDENT
    chunks_per_row: int | None = None  # None: enough programs to fill the device
    capacity: int = CAPACITY
    small_limit: int = SMALL  # at most this many candidates take the all-pairs resolve (0: never)


def _constexprs(kernel, config: LaunchConfig) -> dict:
    """The constexpr arguments of a kernel: one table for the launch and for ``compile_variants``."""
    table = dict(
        BLOCK=config.block,
        NBINS=NBINS,
        ROW_INFO=ROW_INFO,
        RELEVANT_BINS=RELEVANT_BINS,
        MAX_CHUNKS=MAX_CHUNKS,
        MERGE_CHUNKS=MERGE_CHUNKS,
        RBLOCK=config.resolve_block,
        PIVOTS=PIVOTS,
        SMALL=SMALL,
        RESIDENT=config.resident,
    )
    return {name: table[name] for name in _param_names(kernel, constexpr=True)}


def _warps(kernel) -> int:
    return RESOLVE_WARPS if kernel is _resolve_kernel else PASS_WARPS


def _launch_options(kernel, config: LaunchConfig) -> dict:
    """Keyword arguments of a launch besides the runtime arguments (constexprs, warps, compile options)."""
    return dict(_constexprs(kernel, config), num_warps=_warps(kernel), **COMPILE_OPTIONS)


def _param_names(kernel, constexpr: bool) -> list[str]:
    params = inspect.signature(kernel.fn).parameters.values()
    return [
        p.name
        for p in params
        if (p.annotation is tl.constexpr or p.annotation == "tl.constexpr") == constexpr
    ]


_POINTER_TYPES = {
    "ws32_ptr": "*i32",
    "ws64_ptr": "*i64",
    "seeds_ptr": "*i64",
    "tokens_ptr": "*i64",
    "status_ptr": "*i32",
    "inv_t_ptr": "*fp32",
    "top_p_ptr": "*fp32",
    "top_k_ptr": "*i64",
    "min_p_ptr": "*fp32",
}
_FLOAT_ARGS = {"inv_t_value", "top_p_value", "min_p_value"}


def _signature(kernel, logits_type: str) -> dict:
    """Triton types of a kernel's arguments as ``sample_triton`` passes them (ints below 2**31: i32)."""
    sig = {}
    for name in _param_names(kernel, constexpr=False):
        if name == "logits_ptr":
            sig[name] = "*" + logits_type
        elif name in _POINTER_TYPES:
            sig[name] = _POINTER_TYPES[name]
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    for name in _param_names(kernel, constexpr=True):
        sig[name] = "constexpr"
    return sig


def compile_variants() -> list[KernelVariant]:
    """Every compiled form ``sample_triton`` launches on a GPU: each kernel for each logits dtype."""
    config = LaunchConfig()
    variants = []
    for kernel in (_chunk_stats_kernel, _compact_kernel, _resolve_kernel):
        name = kernel.fn.__name__
        for logits_type in LOGITS_DTYPES.values():
            variants.append(
                KernelVariant(
                    name=f"{name}[{logits_type}]",
                    kernel=kernel,
                    signature=_signature(kernel, logits_type),
                    constexprs=_constexprs(kernel, config),
                    num_warps=_warps(kernel),
                    options=dict(COMPILE_OPTIONS),
                )
            )
    return variants


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split(batch: int, num_classes: int, device: torch.device, config: LaunchConfig) -> tuple[int, int]:
    """(chunk, chunks per row): chunks of whole blocks, enough programs to fill the device."""
    blocks = -(-num_classes // config.block)
    if config.chunks_per_row is not None:
        wanted = config.chunks_per_row
    elif device.type == "cuda":
        wanted = -(-PROGRAMS_PER_SM * _sm_count(device.index or 0) // batch)
    else:
        wanted = 1
    chunks = max(1, min(wanted, blocks, MAX_CHUNKS))
    chunk = -(-blocks // chunks) * config.block
    return chunk, -(-num_classes // chunk)


def _scalar_or_rows(value, batch, device, dtype):
    """(per-row tensor or None, scalar value, per-row flag) for a kernel option."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).expand(batch).contiguous(), 0, True
    return None, value, False


def sample_triton(
    logits,
    *,
    temperature,
    top_p,
    top_k,
    min_p,
    seeds,
    config: LaunchConfig | None = None,
    diagnostics: dict | None = None,
):
    """Tokens [B] int64 (-1 on invalid rows) and status [B] int32 (1 = invalid row). No host sync.

    ``seeds``: int64 [B] on the logits' device. ``config``: tests only (see :class:`LaunchConfig`).
    ``diagnostics`` (a dict, filled in): per row, ``candidates`` (how many pass 2 kept) and ``bins`` (how
    many top bins they came from, minus one; -1: none kept, the resolve searched the row or needed none).
    """
    config = config or LaunchConfig()
    batch, num_classes = logits.shape
    device = logits.device
    if device.type == "cpu":
        check_interpreted(_resolve_kernel, "sample")
    elif (config.block, config.resolve_block, config.resident) != (BLOCK, RESOLVE_BLOCK, RESIDENT):
        raise ValueError(
            "sample: LaunchConfig.block/resolve_block/resident differ from the compiled variants "
            f"({BLOCK}, {RESOLVE_BLOCK}, {RESIDENT}); only the interpreter accepts other blocks"
        )
    if not 1 <= config.capacity < 2**31 or not 0 <= config.small_limit <= SMALL:
        raise ValueError(
            f"sample: LaunchConfig capacity must be in [1, 2**31) and small_limit in [0, {SMALL}], "
            f"got {config.capacity}, {config.small_limit}"
        )
    if logits.dtype not in LOGITS_DTYPES:
        logits = logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunk, chunks = _split(batch, num_classes, device, config)
    cells = batch * chunks
    # int32 workspace: chunk maxima (fp32 bits), argmaxes, NaN/+inf counts, histograms, candidates (z bits,
    # index). int64: exact masses and counts per chunk (3 fields), per-row info (count, chosen bins),
    # candidates' masses (bit 62: fails min-p).
    off_max, off_idx, off_bad, off_hist = 0, cells, 2 * cells, 3 * cells
    off_cand_z = off_hist + cells * NBINS
    off_cand_i = off_cand_z + batch * config.capacity
    size32 = off_cand_i + batch * config.capacity
    off_sums, off_info = 0, 3 * cells
    off_cand_q = off_info + batch * ROW_INFO
    size64 = off_cand_q + batch * config.capacity
    if max(size32, size64) >= 2**31:
        raise ValueError(
            f"sample: batch {batch} x vocabulary {num_classes} needs a workspace beyond 2**31 "
            "elements; sample in smaller batches"
        )
    ws32 = torch.empty(size32, dtype=torch.int32, device=device)
    ws64 = torch.empty(size64, dtype=torch.int64, device=device)
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    status = torch.empty(batch, dtype=torch.int32, device=device)

    inv_t, inv_t_value, inv_t_rows = _scalar_or_rows(
        inverse_temperature(temperature), batch, device, torch.float32
    )
    p, p_value, p_rows = _scalar_or_rows(top_p, batch, device, torch.float32)
    k, k_value, k_rows = _scalar_or_rows(top_k, batch, device, torch.int64)
    mp, mp_value, mp_rows = _scalar_or_rows(min_p, batch, device, torch.float32)
    if not k_rows:
        k_value = min(int(k_value), num_classes)  # same meaning (k >= V is off), and an i32 argument
    option_rows = int(inv_t_rows) | 2 * int(p_rows) | 4 * int(k_rows) | 8 * int(mp_rows)
    unused_fp32 = ws32.view(torch.float32)  # a pointer of the argument's type, never read
    options = (
        inv_t if inv_t_rows else unused_fp32,
        float(inv_t_value),
        p if p_rows else unused_fp32,
        float(p_value),
        k if k_rows else ws64,
        int(k_value),
        mp if mp_rows else unused_fp32,
        float(mp_value),
        option_rows,
    )
    stride = logits.stride(0)

    _chunk_stats_kernel[(batch, chunks)](
        logits,
        stride,
        num_classes,
        chunk,
        chunks,
        ws32,
        ws64,
        off_max,
        off_idx,
        off_bad,
        off_hist,
        off_info,
        *options,
        **_launch_options(_chunk_stats_kernel, config),
    )
    _compact_kernel[(batch, chunks)](
        logits,
        stride,
        num_classes,
        chunk,
        chunks,
        config.capacity,
        ws32,
        ws64,
        off_max,
        off_bad,
        off_hist,
        off_info,
        off_sums,
        off_cand_z,
        off_cand_i,
        off_cand_q,
        cells,
        *options,
        **_launch_options(_compact_kernel, config),
    )
    _resolve_kernel[(batch,)](
        logits,
        stride,
        num_classes,
        chunk,
        chunks,
        config.capacity,
        ws32,
        ws64,
        off_max,
        off_idx,
        off_bad,
        off_info,
        off_sums,
        off_cand_z,
        off_cand_i,
        off_cand_q,
        cells,
        config.small_limit,
        seeds.contiguous(),
        tokens,
        status,
        *options,
        **_launch_options(_resolve_kernel, config),
    )
    if diagnostics is not None:
        info = ws64[off_info:off_cand_q].view(batch, ROW_INFO)
        diagnostics.update(candidates=info[:, 0], bins=info[:, 1], chunks_per_row=chunks)
    return tokens, status
