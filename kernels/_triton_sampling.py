"""Triton sampler: temperature, top-k, top-p, min-p without sorting (semantics: ``sampling.py``).

One program per row; the row's result depends on that row alone (batch-invariant). Passes over the row:
  1. validity (NaN / +inf / all -inf), the greedy argmax (lowest index), the maximum;
  2. top-k only: the k-th largest key by a 16-way search over the int32 order keys of z (8 passes at
     most, exact: counts are integers);
  3. the integer masses Q_k (top-k survivors) and Q_s (survivors of top-k and min-p);
  4. rejection rounds (FlashInfer's idea, made exact with integer masses): draw x from q restricted to
     a set S that contains the kept set K (at first, the top-k and min-p survivors), by an inverse-CDF
     scan that stops at x; then one pass for the mass ranked before x. x is in K iff that mass is
     < T = max(1, ceil(p * Q_k)): accept. Otherwise every token ranked at or after x is outside K, so
     S shrinks to the tokens ranked before x (whose mass was just computed) and we draw again. The
     accepted token is distributed as q restricted to K, as the sort-based reference draws it; S
     shrinks strictly each round, so the loop ends (typically after 1-3 rounds).
Only Triton APIs present in 3.6 (tl.cumsum, int64 arithmetic, while loops).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sampling import MASS_BITS, inverse_temperature
from .utils import interpreter_enabled

NUM_PIVOTS = 16


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
def _z_and_key(x, inv_t):
    """z = x * inv_t (-inf kept, -0 -> +0) and its int32 order key (monotone in z)."""
    z = tl.where(x == float("-inf"), float("-inf"), x * inv_t)
    z = tl.where(z == 0.0, 0.0, z)
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return z, key


@triton.jit
def _sample_kernel(logits_ptr, stride, num_classes, seeds_ptr, tokens_ptr, status_ptr,
                   inv_t_ptr, inv_t_value, top_p_ptr, top_p_value, top_k_ptr, top_k_value, min_p_ptr, min_p_value,
                   INV_T_ROWS: tl.constexpr, TOP_P_ROWS: tl.constexpr, TOP_K_ROWS: tl.constexpr,
                   MIN_P_ROWS: tl.constexpr, MASS_SCALE: tl.constexpr, PIVOTS: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    if INV_T_ROWS:
        inv_t = tl.load(inv_t_ptr + row).to(tl.float32)
    else:
        inv_t = inv_t_value
    if TOP_P_ROWS:
        top_p = tl.load(top_p_ptr + row).to(tl.float32)
    else:
        top_p = top_p_value
    if TOP_K_ROWS:
        top_k = tl.load(top_k_ptr + row).to(tl.int64)
    else:
        top_k = top_k_value + tl.zeros((), tl.int64)  # ints equal to 1 arrive as constexpr
    if MIN_P_ROWS:
        min_p = tl.load(min_p_ptr + row).to(tl.float32)
    else:
        min_p = min_p_value

    # Pass 1: validity, argmax (lowest index on ties), maximum.
    n_bad = tl.zeros((), tl.int32)
    best = tl.full((), neg_inf, tl.float32)
    best_idx = tl.zeros((), tl.int64)
    for start in range(0, num_classes, BLOCK):
        cols = start + offs
        mask = cols < num_classes
        x = tl.load(x_row + cols, mask=mask, other=neg_inf).to(tl.float32)
        n_bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), 0)
        block_max = tl.max(x, 0)
        block_idx = tl.min(tl.where(x == block_max, cols, num_classes), 0).to(tl.int64)
        take = block_max > best
        best_idx = tl.where(take, block_idx, best_idx)
        best = tl.where(take, block_max, best)
    invalid = (n_bad > 0) | (best == neg_inf)
    sampled = (n_bad == 0) & (best > neg_inf) & (inv_t > 0.0) & (top_k != 1)
    token = tl.where(invalid, -1, best_idx)

    if sampled:
        z_max = best * inv_t
        min_p_eff = tl.minimum(min_p, 1.0)
        top_k_active = (top_k > 0) & (top_k < num_classes)
        top_p_active = top_p < 1.0

        # Pass 2 (top-k only): the k-th largest key v_k = the largest v with #(key >= v) >= k.
        lo = tl.full((), -2147483648, tl.int64)  # #(key >= lo) = V >= k
        if top_k_active:
            _, key_max = _z_and_key(best, inv_t)
            hi = key_max.to(tl.int64) + 1  # #(key >= hi) = 0 < k
            piv = tl.arange(0, PIVOTS).to(tl.int64)
            while hi - lo > 1:
                pivots = lo + ((hi - lo) * (piv + 1)) // (PIVOTS + 1)
                counts = tl.zeros((PIVOTS,), tl.int64)
                for start in range(0, num_classes, BLOCK):
                    cols = start + offs
                    x = tl.load(x_row + cols, mask=cols < num_classes, other=neg_inf).to(tl.float32)
                    _, key = _z_and_key(x, inv_t)
                    key = tl.where(cols < num_classes, key.to(tl.int64), -4294967296)
                    counts += tl.sum((key[:, None] >= pivots[None, :]).to(tl.int64), 0)
                ok = counts >= top_k
                new_lo = tl.max(tl.where(ok, pivots, lo), 0)
                new_hi = tl.min(tl.where(ok, hi, pivots), 0)
                lo = new_lo
                hi = new_hi
        # Now the top-k set is {key >= lo} (everything when top-k is off).

        # Pass 3: Q_k (top-k survivors) and Q_s (top-k and min-p survivors).
        mass_k = tl.zeros((), tl.int64)
        mass_s = tl.zeros((), tl.int64)
        for start in range(0, num_classes, BLOCK):
            cols = start + offs
            mask = cols < num_classes
            x = tl.load(x_row + cols, mask=mask, other=neg_inf).to(tl.float32)
            z, key = _z_and_key(x, inv_t)
            w = tl.exp(z - z_max)
            q = (w * MASS_SCALE).to(tl.int64)
            in_k = mask & (key.to(tl.int64) >= lo)
            mass_k += tl.sum(tl.where(in_k, q, 0), 0)
            mass_s += tl.sum(tl.where(in_k & (w >= min_p_eff), q, 0), 0)

        target = tl.zeros((), tl.int64)
        if top_p_active:
            exact = top_p.to(tl.float64) * mass_k.to(tl.float64)
            target = exact.to(tl.int64)
            target = tl.where(target.to(tl.float64) < exact, target + 1, target)
            target = tl.maximum(target, 1)

        seed = tl.load(seeds_ptr + row)
        stream = _mix32(_mix32((seed & 0xFFFFFFFF) ^ 0x3C6EF372) ^ ((seed >> 32) & 0xFFFFFFFF))
        # S = tokens ranked before (bound_key, bound_idx), within the top-k and min-p survivors.
        bound_key = lo - 1
        bound_idx = tl.zeros((), tl.int64)
        mass_set = mass_s
        counter = tl.zeros((), tl.int64)
        done = tl.zeros((), tl.int32)
        while done == 0:
            r = _rand53(stream, counter)  # round 0 uses the reference's number: same token when S == K
            counter += 1
            u = (r.to(tl.float64) * 1.1102230246251565e-16 * mass_set.to(tl.float64)).to(tl.int64)  # r * 2^-53 * S
            # Inverse CDF over S in vocabulary order, stopping at the block that holds the draw.
            pick = tl.full((), -1, tl.int64)
            running = tl.zeros((), tl.int64)
            start = tl.zeros((), tl.int32)
            while (pick < 0) & (start < num_classes):
                cols = start + offs
                mask = cols < num_classes
                x = tl.load(x_row + cols, mask=mask, other=neg_inf).to(tl.float32)
                z, key = _z_and_key(x, inv_t)
                w = tl.exp(z - z_max)
                q = (w * MASS_SCALE).to(tl.int64)
                key64 = key.to(tl.int64)
                in_s = mask & (w >= min_p_eff) & ((key64 > bound_key) | ((key64 == bound_key) & (cols < bound_idx)))
                q = tl.where(in_s, q, 0)
                cumulative = running + tl.cumsum(q, 0)
                first = tl.min(tl.where(cumulative > u, cols, num_classes), 0)
                pick = tl.where(first < num_classes, first.to(tl.int64), pick)
                running += tl.sum(q, 0)
                start += BLOCK
            pick = tl.maximum(pick, 0)  # unreachable guard: u < mass_set, so the scan always stops
            if top_p_active:
                x_pick = tl.load(x_row + pick).to(tl.float32)
                _, key_pick = _z_and_key(x_pick, inv_t)
                key_pick = key_pick.to(tl.int64)
                # Mass ranked before the pick (all of it is inside the top-k set, as the pick is).
                before = tl.zeros((), tl.int64)
                for start2 in range(0, num_classes, BLOCK):
                    cols = start2 + offs
                    mask = cols < num_classes
                    x = tl.load(x_row + cols, mask=mask, other=neg_inf).to(tl.float32)
                    z, key = _z_and_key(x, inv_t)
                    q = (tl.exp(z - z_max) * MASS_SCALE).to(tl.int64)
                    key64 = key.to(tl.int64)
                    ahead = mask & ((key64 > key_pick) | ((key64 == key_pick) & (cols < pick)))
                    before += tl.sum(tl.where(ahead, q, 0), 0)
                accepted = before < target
                done = accepted.to(tl.int32)
                # Rejected: S becomes the tokens ranked before the pick (still a superset of K). Its
                # min-p survivors' mass is `before` minus the ranked-before tokens failing min-p; as
                # min-p keeps a prefix of the order and the pick passed it, there are none.
                bound_key = tl.where(accepted, bound_key, key_pick)
                bound_idx = tl.where(accepted, bound_idx, pick)
                mass_set = tl.where(accepted, mass_set, before)
            else:
                done = tl.full((), 1, tl.int32)
            token = pick
    tl.store(tokens_ptr + row, token)
    tl.store(status_ptr + row, invalid.to(tl.int32))


def _launch_config(num_classes: int):
    block = triton.next_power_of_2(num_classes)
    if interpreter_enabled():
        return min(block, 4096), 1
    return min(block, 1024), 8


def _scalar_or_rows(value, batch, device, dtype):
    """(pointer tensor, scalar value, per-row flag) for a kernel option."""
    if isinstance(value, torch.Tensor):
        rows = value.to(device=device, dtype=dtype).expand(batch).contiguous()
        return rows, 0, True
    return None, value, False


def sample_triton(logits, *, temperature, top_p, top_k, min_p, seeds):
    """Tokens [B] int64 (-1 on invalid rows) and status [B] int32 (1 = invalid row). No host sync."""
    batch, num_classes = logits.shape
    device = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    status = torch.empty(batch, dtype=torch.int32, device=device)
    inv_t, inv_t_value, inv_t_rows = _scalar_or_rows(inverse_temperature(temperature), batch, device, torch.float32)
    p, p_value, p_rows = _scalar_or_rows(top_p, batch, device, torch.float32)
    k, k_value, k_rows = _scalar_or_rows(top_k, batch, device, torch.int64)
    mp, mp_value, mp_rows = _scalar_or_rows(min_p, batch, device, torch.float32)
    dummy = tokens
    block, warps = _launch_config(num_classes)
    _sample_kernel[(batch,)](
        logits, logits.stride(0), num_classes, seeds.contiguous(), tokens, status,
        inv_t if inv_t_rows else dummy, float(inv_t_value), p if p_rows else dummy, float(p_value),
        k if k_rows else dummy, int(k_value), mp if mp_rows else dummy, float(mp_value),
        INV_T_ROWS=inv_t_rows, TOP_P_ROWS=p_rows, TOP_K_ROWS=k_rows, MIN_P_ROWS=mp_rows,
        MASS_SCALE=float(2**MASS_BITS), PIVOTS=NUM_PIVOTS, BLOCK=block, num_warps=warps)
    return tokens, status
