"""Sampling a token per row from logits, with temperature, top-k, top-p and min-p.

Exact semantics (the sort-based torch reference below implements them literally; the Triton kernels
(``_triton_sampling.py``), which never sort, compute the same kept set and integer masses, and with the
same ``seed`` return the same tokens as the reference):

* Invalid rows: a row holding NaN or +inf, or only -inf, is invalid. ``on_invalid="raise"`` (default)
  raises ``ValueError`` naming the rows (the Triton path flags rows on the device and reads the flags
  back once: one small device-to-host copy per call); ``on_invalid="flag"`` never synchronises and
  returns token -1 for invalid rows (the caller checks ``(tokens < 0).any()`` when it likes).
* Greedy: ``temperature <= 0`` or ``top_k == 1``: the argmax of the logits, lowest index on ties.
* Otherwise, in this order (the order of Hugging Face's warpers):
  1. temperature: ``z = logits * (1 / temperature)`` in fp32 (the reciprocal rounded to fp32 first);
     -inf stays -inf; -0.0 counts as +0.0.
  2. order: tokens ranked by ``z`` descending, ties by lower index first.
  3. weights: ``w = exp(z - max z)`` (fp32), and the integer mass ``q = floor(w * 2**32)`` (int64).
     All masses below are sums of ``q``: exact integers, so the kept set does not depend on the order
     of summation, the block size, or the rest of the batch. A token with ``w < 2**-32`` (probability
     below 2^-32 of the top token's) has mass 0 and is never drawn; the total-variation distance to
     sampling ``w`` exactly is at most V * 2**-32.
  4. top-k (``0 < k < V``): keep tokens with ``z >= `` the k-th largest ``z`` (ties at the k-th value
     are all kept, as in HF's ``TopKLogitsWarper``). ``k <= 0`` or ``k >= V``: off.
  5. top-p (``p < 1``), on the top-k survivors: with ``Q`` their total mass and
     ``T = max(1, ceil(p * Q))`` (fp64), keep the shortest prefix of the order whose mass reaches
     ``T``: a token is kept iff the mass of the survivors ranked before it is ``< T``. So ties at the
     boundary are taken lowest index first, and only as many as needed: never over-accepting.
     ``p <= 0`` keeps the top token only; ``p >= 1``: off.
  6. min-p (``min_p > 0``): keep tokens with ``w >= min_p`` (i.e. probability >= min_p times the top
     token's; ``min_p`` is clipped to 1). Applied after top-p, as an intersection.
  7. draw: with ``Q_K`` the kept mass and ``r`` a 53-bit random integer, ``u = floor(r * 2**-53 * Q_K)``
     (fp64); the token is the first index (in vocabulary order) whose running kept mass exceeds ``u``.
* Randomness: ``seed`` (int, or an int64 tensor [B] of per-row seeds) makes each row's random numbers
  a hash of that row's seed alone, never of its position in the batch: a row gives the same token for
  the same seed whatever else is in the batch, on either backend. An int seed gives every row the same
  stream (pass per-row seeds, e.g. from :func:`sampling_seeds`, and a fresh seed per decoding step).
  ``generator`` (a ``torch.Generator``) draws the numbers torch-style instead (the torch path draws
  one 53-bit integer per row from it; the Triton path draws per-row seeds from it): reproducible for
  the same batch, not batch-invariant. With neither, torch's default generator is used.

Each option is a Python number or a tensor [B] (one value per row).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .utils import MASS_BITS, inverse_temperature, resolve_backend

_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------
# Counter-based random numbers, identical in torch and Triton (int64 arithmetic, no overflow).
# ---------------------------------------------------------------------------------------------------


def _mul32(a, m: int):
    """(a * m) mod 2**32 for 0 <= a < 2**32, split in 16-bit halves of m so that int64 never overflows."""
    return (a * (m & 0xFFFF) + (((a * (m >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """The 'lowbias32' integer hash (Chris Wellons): a bijection on 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_key(seed_lo, seed_hi):
    """A row's 32-bit key from the two halves of its 64-bit seed."""
    return _mix32(_mix32(seed_lo ^ 0x3C6EF372) ^ seed_hi)


def rand53(key, counter):
    """The ``counter``-th 53-bit random integer of the stream ``key`` (both tensors/ints >= 0)."""
    a = _mix32(key ^ _mix32((2 * counter + 0x1B873593) & _MASK32))
    b = _mix32(a ^ key ^ 0x85EBCA6B)
    return ((a >> 11) << 32) | b


def split_seeds(seeds: torch.Tensor):
    """int64 seeds -> (lo, hi) 32-bit halves as int64 tensors."""
    return seeds & _MASK32, (seeds >> 32) & _MASK32


def sampling_seeds(seed: int, step: int, batch_size: int, device=None) -> torch.Tensor:
    """Per-row seeds [batch_size] for decoding step ``step`` of a run seeded with ``seed``.

    Row r gets ``splitmix64(splitmix64(seed) ^ step) + r``; the sampler hashes it again, so nearby
    values give independent streams.
    """

    def splitmix64(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & (2**64 - 1)
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        return x ^ (x >> 31)

    base = splitmix64(splitmix64(int(seed) & (2**64 - 1)) ^ (int(step) & (2**64 - 1))) >> 2  # < 2**62
    return torch.arange(batch_size, dtype=torch.int64, device=device) + base


# ---------------------------------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------------------------------


def _check_scalar(name, value, low, high, integer=False):
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"sample: {name} must be an int >= {low} (or a tensor [B]), got {value!r}")
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ValueError(
            f"sample: {name} must be a number in [{low}, {high}] (or a tensor [B]), got {value!r}"
        )


def _option(name, value, batch, device, dtype):
    if isinstance(value, torch.Tensor):
        if value.shape not in ((batch,), ()):
            raise ValueError(
                f"sample: {name} must be a number or a tensor [{batch}], got shape {tuple(value.shape)}"
            )
        return value.to(device=device, dtype=dtype).expand(batch).contiguous()
    return torch.full((batch,), value, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# The sort-based reference.
# ---------------------------------------------------------------------------------------------------


def invalid_rows_torch(logits: torch.Tensor) -> torch.Tensor:
    """Bool [B]: the row holds NaN or +inf, or nothing but -inf (one pass: amax propagates NaN)."""
    top = logits.amax(1).float()
    return torch.isnan(top) | (top == math.inf) | (top == -math.inf)


def scaled_logits(x: torch.Tensor, inv_temp: torch.Tensor) -> torch.Tensor:
    """z = x * inv_temp in fp32, -inf kept, -0.0 made +0.0 (so that equal values have equal keys)."""
    x = x.float()
    z = torch.where(x == -math.inf, -math.inf, x * inv_temp[:, None])
    return torch.where(z == 0, 0.0, z)


def kept_mask_torch(logits, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0):
    """Bool [B, V]: the tokens each row may draw (rows that are greedy or invalid: all True), and q [B, V].

    The literal, sort-based definition of the module docstring (steps 1-6).
    """
    batch, vocab = logits.shape
    device = logits.device
    inv_temp = _option("temperature", inverse_temperature(temperature), batch, device, torch.float32)
    p = _option("top_p", top_p, batch, device, torch.float32)
    k = _option("top_k", top_k, batch, device, torch.int64)
    min_p = _option("min_p", min_p, batch, device, torch.float32)
    z = scaled_logits(logits, inv_temp)
    z_max = z.amax(1, keepdim=True)
    w = torch.exp(z - z_max)
    q = (w * float(2**MASS_BITS)).to(torch.int64)
    keep = torch.ones_like(z, dtype=torch.bool)
    active_k = (k > 0) & (k < vocab)
    active_p = p < 1
    if bool((active_k | active_p).any()):
        z_sorted, order = torch.sort(z, dim=1, descending=True, stable=True)
        kth = z_sorted.gather(1, (k.clamp(1, vocab) - 1)[:, None])
        keep_k_sorted = (z_sorted >= kth) | ~active_k[:, None]
        q_sorted = q.gather(1, order) * keep_k_sorted
        mass_k = q_sorted.sum(1)
        target = torch.ceil(p.double() * mass_k.double()).to(torch.int64).clamp_min(1)
        before = torch.cumsum(q_sorted, 1) - q_sorted
        keep_sorted = keep_k_sorted & ((before < target[:, None]) | ~active_p[:, None])
        keep = torch.empty_like(keep).scatter_(1, order, keep_sorted)
    keep &= (w >= min_p.clamp(max=1.0)[:, None]) | (min_p <= 0)[:, None]
    return keep, q


CANDIDATES = 256  # top-p-only rows: the candidate set tried before falling back to a full sort


def _sample_from_candidates(z, index, k, p, min_p, random53, vocab_mass):
    """Steps 4-7 on the ``W`` largest logits of each row (``z`` [B, W] scaled, ``index`` their token ids).

    ``vocab_mass`` [B]: the mass of the whole vocabulary (top-p's total when top-k is off), or None when
    every row has top-k on. Returns (tokens [B], exact [B]): ``exact`` is False for a row whose kept set
    might reach beyond the candidates, which the caller then samples by the full sort. A row is decided
    exactly when its kept set lies among the candidates whose ``z`` is strictly above the smallest
    candidate's: every token with such a value is a candidate (scaling by 1/temperature keeps the order),
    so their order (value, then index) and masses are those of the full definition, and every other token
    ranks after all of them.
    """
    width = z.shape[1]
    # Order the candidates as the definition does: by index, then stably by value descending.
    index, by_index = index.sort(1)
    z = z.gather(1, by_index)
    z, rank_order = torch.sort(z, dim=1, descending=True, stable=True)
    edge = z[:, -1:]  # tokens equal to it may lie outside the candidates
    strict = z > edge
    w = torch.exp(z - z[:, :1])
    q = (w * float(2**MASS_BITS)).to(torch.int64)
    active_k = k > 0  # the caller passes 0 for rows with top-k off
    kth = z.gather(1, (k.clamp(1, width) - 1)[:, None])
    keep_k = (z >= kth) | ~active_k[:, None]
    exact_k = ~active_k | ((k <= width) & (kth[:, 0] > edge[:, 0]))
    q_k = q * keep_k
    # Top-k on: the survivors are all candidates. Off: top-p's total is the whole vocabulary's mass.
    mass_k = q_k.sum(1) if vocab_mass is None else torch.where(active_k, q_k.sum(1), vocab_mass)
    target = torch.ceil(p.double() * mass_k.double()).to(torch.int64).clamp_min(1)
    before = torch.cumsum(q_k, 1) - q_k
    active_p = p < 1
    keep = keep_k & ((before < target[:, None]) | ~active_p[:, None])
    # Top-p is decided inside the strict candidates iff their mass reaches the target.
    exact_p = ~active_p | ((q_k * strict).sum(1) >= target)
    keep &= (w >= min_p.clamp(max=1.0)[:, None]) | (min_p <= 0)[:, None]
    # Step 7 runs in vocabulary order: back to index order (undo rank_order).
    keep_by_index = torch.empty_like(keep).scatter_(1, rank_order, keep)
    q_index = torch.empty_like(q).scatter_(1, rank_order, q) * keep_by_index
    cumulative = torch.cumsum(q_index, 1)
    u = torch.floor(random53.double() * 2.0**-53 * cumulative[:, -1].double()).to(torch.int64)
    position = torch.searchsorted(cumulative, u[:, None], right=True).clamp_max(width - 1)
    return index.gather(1, position).squeeze(1), exact_k & exact_p


def _sample_by_sort(logits, temperature, top_p, top_k, min_p, random53):
    keep, q = kept_mask_torch(logits, temperature, top_p, top_k, min_p)
    q = q * keep
    cumulative = torch.cumsum(q, 1)
    total = cumulative[:, -1]
    u = torch.floor(random53.double() * 2.0**-53 * total.double()).to(torch.int64)
    return torch.searchsorted(cumulative, u[:, None], right=True).squeeze(1).clamp_max(logits.shape[1] - 1)


def sample_torch(
    logits,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    min_p=0.0,
    *,
    random53: torch.Tensor,
    candidates: int = CANDIDATES,
):
    """Tokens [B] (int64) by the reference definition; ``random53`` [B] int64 in [0, 2**53). No validity check.

    With top-k or top-p on, each row is first decided on its few largest logits (top-k rows: ``k`` plus a
    margin; top-p-only rows: ``candidates``), which gives the same token as the full sort (see
    ``_sample_from_candidates``); only rows that cannot be decided there are sorted in full.
    """
    batch, vocab = logits.shape
    device = logits.device
    x = logits.float()
    inv_temp = _option("temperature", inverse_temperature(temperature), batch, device, torch.float32)
    k = _option("top_k", top_k, batch, device, torch.int64)
    greedy = x.argmax(1)  # first index of the maximum
    p = _option("top_p", top_p, batch, device, torch.float32)
    min_p_t = _option("min_p", min_p, batch, device, torch.float32)
    is_greedy = (inv_temp <= 0) | (k == 1)
    if bool(is_greedy.all()):
        return greedy
    active_k = (k > 0) & (k < vocab)
    filtered = (active_k | (p < 1)) & ~is_greedy
    if not bool(filtered.any()):  # neither top-k nor top-p: no order needed at all
        return torch.where(
            is_greedy, greedy, _sample_by_sort(logits, temperature, top_p, top_k, min_p, random53)
        )
    width = min(vocab, max(candidates, int(torch.where(active_k, k, 0).max()) + 16))
    values, index = torch.topk(x, width, dim=1)
    z = scaled_logits(values, inv_temp)
    vocab_mass = None
    if bool((~active_k & filtered).any()):  # top-p without top-k: its total is the whole row's mass
        w_all = torch.exp(scaled_logits(x, inv_temp) - z[:, :1])
        vocab_mass = (w_all * float(2**MASS_BITS)).to(torch.int64).sum(1)
    token, exact = _sample_from_candidates(
        z, index, torch.where(active_k, k, 0), p, min_p_t, random53, vocab_mass
    )
    exact &= filtered
    redo = ~exact & ~is_greedy
    if bool(redo.any()):
        rows = redo.nonzero().flatten()
        pick = lambda v: v[rows] if isinstance(v, torch.Tensor) and v.dim() == 1 else v  # noqa: E731
        token[rows] = _sample_by_sort(
            logits[rows], pick(temperature), pick(top_p), pick(top_k), pick(min_p), random53[rows]
        )
    return torch.where(is_greedy, greedy, token)


# ---------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------


def _raise_invalid(rows: list[int], batch: int):
    shown = ", ".join(str(r) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
    raise ValueError(
        f"sample: logits row(s) {shown} (of {batch}) hold NaN or +inf, or only -inf: "
        "no distribution to sample from"
    )


def sample(
    logits: torch.Tensor,
    *,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    min_p=0.0,
    seed=None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    on_invalid: str = "raise",
):
    """Sample one token per row of ``logits`` [B, V]: LongTensor [B]. Semantics: module docstring."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"sample: logits must be [B, V] with V > 0, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"sample: logits must be floating point, got {logits.dtype}")
    if on_invalid not in ("raise", "flag"):
        raise ValueError(f"sample: on_invalid must be 'raise' or 'flag', got {on_invalid!r}")
    if seed is not None and generator is not None:
        raise ValueError("sample: pass seed or generator, not both")
    for name, value, low, high, integer in (
        ("temperature", temperature, 0.0, 1e30, False),
        ("top_p", top_p, 0.0, 1.0, False),
        ("top_k", top_k, 0, None, True),
        ("min_p", min_p, 0.0, 1.0, False),
    ):
        if not isinstance(value, torch.Tensor):
            _check_scalar(name, value, low, high, integer)
    batch = logits.shape[0]
    device = logits.device
    resolved = resolve_backend(backend, device, "sample")
    if batch == 0:
        return torch.empty(0, dtype=torch.int64, device=device)

    if isinstance(seed, torch.Tensor):
        if seed.shape not in ((batch,), ()):
            raise ValueError(
                f"sample: seed must be an int or an int64 tensor [{batch}], got {tuple(seed.shape)}"
            )
        seeds = seed.to(device=device, dtype=torch.int64).expand(batch).contiguous()
    elif seed is not None:
        value = int(seed) & (2**64 - 1)
        seeds = torch.full(
            (batch,), value - 2**64 if value >= 2**63 else value, dtype=torch.int64, device=device
        )
    else:
        seeds = None

    if resolved == "triton":
        from . import _triton_sampling as ts  # noqa: PLC0415 (optional: triton, imported once TRITON_INTERPRET is settled)

        if seeds is None:
            gen_device = generator.device if generator is not None else device
            seeds = torch.randint(0, 2**62, (batch,), generator=generator, device=gen_device).to(device)
        tokens, status = ts.sample_triton(
            logits, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seeds=seeds
        )
        if on_invalid == "raise":
            if bool(status.any()):
                _raise_invalid(status.nonzero().flatten().tolist(), batch)
        return tokens

    invalid = invalid_rows_torch(logits)
    if bool(invalid.any()):
        if on_invalid == "raise":
            _raise_invalid(invalid.nonzero().flatten().tolist(), batch)
        logits = torch.where(
            invalid[:, None], 0.0, logits.float()
        )  # keep the arithmetic finite; flagged below
    if seeds is not None:
        lo, hi = split_seeds(seeds)
        random53 = rand53(row_key(lo, hi), 0)
    else:
        gen_device = generator.device if generator is not None else device
        random53 = torch.randint(0, 2**53, (batch,), generator=generator, device=gen_device).to(device)
    tokens = sample_torch(logits, temperature, top_p, top_k, min_p, random53=random53)
    return torch.where(invalid, -1, tokens)


class Sampler(nn.Module):
    """``tokens = Sampler(temperature=..., top_p=...)(logits, seed=...)``: see :func:`sample`."""

    def __init__(
        self, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, backend: str = "auto", on_invalid: str = "raise"
    ):
        super().__init__()
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p
        self.backend, self.on_invalid = backend, on_invalid

    def forward(self, logits, seed=None, generator=None):
        return sample(
            logits,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=seed,
            generator=generator,
            backend=self.backend,
            on_invalid=self.on_invalid,
        )
