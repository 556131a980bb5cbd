"""hfdist.kernels.sample on both backends against the sort-based reference (kernels/sampling.py).

All draws use fixed seeds, so every statistical check below is deterministic: its threshold is chosen
so that a correct sampler fails with probability < 1e-4 for a fresh choice of seeds.
"""

import math

import pytest
import torch

from hfdist.kernels import Sampler, sample, sampling_seeds
from hfdist.kernels.sampling import MASS_BITS, kept_mask_torch
from hfdist.kernels.utils import interpreter_enabled

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ["torch", "triton"]
# The interpreter runs one Python loop per row and pass (~20 ms per draw): few draws there.
DRAWS = {"torch": 20000, "triton": 20000 if CUDA else 400}
REPEATS = {"torch": 64, "triton": 64 if CUDA else 8}
# Chi-square critical values at alpha = 1e-4 by degrees of freedom.
CHI2_CRIT = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88, 8: 31.83, 9: 33.72}


def _skip_unless_runnable(backend):
    if backend == "triton" and not CUDA and not interpreter_enabled():
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")


def _tie_logits():
    """Rows whose top-p / top-k boundaries fall inside groups of equal logits."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 40, generator=gen) - 3.0
    rows[0, [3, 9, 17, 30, 31]] = 2.0  # five equal leaders: p=0.5 needs exactly 3 of them (lowest index)
    rows[1, [5, 6]] = 4.0  # a pair at the top, then a tie group of three at the boundary
    rows[1, [1, 20, 33]] = 3.0
    rows[2, :] = 0.0  # uniform: every cut is a tie
    rows[3, [0, 39]] = float("-inf")  # masked tokens never drawn
    return rows.to(DEVICE)


CONFIGS = [
    dict(top_p=0.5),
    dict(top_p=0.9, temperature=0.7),
    dict(top_k=3),
    dict(top_k=4, top_p=0.6),
    dict(min_p=0.3),
    dict(top_k=10, top_p=0.8, min_p=0.05, temperature=1.3),
]


def test_reference_keeps_lowest_index_ties_only():
    """The reference's boundary: the shortest prefix (ties by lower index) whose mass reaches p."""
    logits = _tie_logits().cpu()
    keep, _ = kept_mask_torch(logits, top_p=0.5)
    assert keep[0].nonzero().flatten().tolist() == [3, 9, 17]  # 3/5 of the leaders' mass >= 0.5 > 2/5
    keep, _ = kept_mask_torch(logits, top_p=0.25)
    assert keep[2].nonzero().flatten().tolist() == list(range(10))  # 0.25 * 40 tokens of a uniform row
    keep, _ = kept_mask_torch(logits, top_k=3)
    assert keep[1].nonzero().flatten().tolist() == [1, 5, 6, 20, 33]  # top-k keeps ties at the k-th value
    keep, _ = kept_mask_torch(logits, top_p=0.0)
    assert keep.sum(1).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_first_argmax(backend, dtype):
    _skip_unless_runnable(backend)
    logits = _tie_logits().to(dtype)
    first_max = torch.stack([(row == row.max()).nonzero()[0, 0] for row in logits.float()])
    assert torch.equal(sample(logits, temperature=0.0, backend=backend), first_max)
    assert torch.equal(sample(logits, top_k=1, temperature=0.8, seed=3, backend=backend), first_max)
    per_row = torch.tensor([0.0, 1.0, 0.0, 1.0], device=DEVICE)
    tokens = sample(
        logits, temperature=per_row, top_k=torch.tensor([0, 1, 0, 1], device=DEVICE), seed=1, backend=backend
    )
    assert torch.equal(tokens, first_max)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_samples_lie_in_reference_kept_set(backend, config):
    _skip_unless_runnable(backend)
    kw = CONFIGS[config]
    logits = _tie_logits()
    repeats = REPEATS[backend]
    batch = logits.repeat_interleave(repeats, dim=0)
    tokens = sample(
        batch, seed=torch.arange(batch.shape[0], device=DEVICE) + 1000 * config, backend=backend, **kw
    )
    keep, _ = kept_mask_torch(batch, **kw)
    assert keep[torch.arange(batch.shape[0], device=DEVICE), tokens].all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [0, 3, 5] if CUDA or not interpreter_enabled() else [3])
def test_frequencies_match_reference(backend, config):
    """Chi-square of the token counts against the reference's renormalised kept probabilities."""
    _skip_unless_runnable(backend)
    kw = CONFIGS[config]
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(1, 10, generator=gen)
    row[0, [2, 5, 7]] = 1.0  # a tie group at the boundary of top_k=4 / top_p=0.6
    row[0, 0] = 1.6
    row = row.to(DEVICE)
    draws = DRAWS[backend]
    tokens = sample(row.expand(draws, -1), seed=torch.arange(draws, device=DEVICE), backend=backend, **kw)
    keep, q = kept_mask_torch(row, **kw)
    expected = (q * keep)[0].double()
    expected = expected / expected.sum()
    counts = torch.bincount(tokens, minlength=row.shape[1]).double()
    assert counts[~keep[0]].sum() == 0
    kept = keep[0] & (expected > 0)
    chi2 = (((counts - draws * expected)[kept]) ** 2 / (draws * expected[kept])).sum().item()
    df = int(kept.sum()) - 1
    assert df >= 2 and chi2 < CHI2_CRIT[df], (chi2, counts.tolist(), (draws * expected).tolist())


def _random_options(batch, gen):
    """Per-row options mixing every filter, on and off (top-k 1 rows are greedy)."""
    top_k = torch.randint(0, 60, (batch,), generator=gen)
    top_k[::4] = 0
    top_p = torch.rand(batch, generator=gen) * 1.3
    return dict(
        temperature=(torch.rand(batch, generator=gen) * 1.5).to(DEVICE),
        top_k=top_k.to(DEVICE),
        top_p=torch.where(top_p > 1, 1.0, top_p).to(DEVICE),
        min_p=torch.where(torch.rand(batch, generator=gen) < 0.3, 0.05, 0.0).to(DEVICE),
    )


def test_triton_and_reference_draw_the_same_tokens():
    """Same random numbers, same integer masses, the same exact kept set: identical tokens, top-p included."""
    _skip_unless_runnable("triton")
    gen = torch.Generator().manual_seed(2)
    batch = 48
    logits = (torch.randn(batch, 300, generator=gen) * 2).to(DEVICE)
    logits[::7, :50] = float("-inf")
    logits[1::7] = torch.randint(-4, 2, (300,), generator=gen).float().to(DEVICE)  # tie groups at every cut
    options = _random_options(batch, gen)
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen).to(DEVICE)
    for dtype in [torch.float32, torch.bfloat16]:
        x = logits.to(dtype)
        assert torch.equal(
            sample(x, seed=seeds, backend="triton", **options),
            sample(x, seed=seeds, backend="torch", **options),
        )


# Rows wider than one block, split over several programs. Compiled (CUDA): Llama 3's vocabulary with the
# compiled blocks. Interpreter: small rows with small blocks, so that they still span several blocks,
# chunks (programs per row) and resolve blocks. Each configuration forces one path of the resolve.
WIDE_SHAPE = (64, 128256) if CUDA else (6, 257)


def _launch_configs():
    from hfdist.kernels._triton_sampling import LaunchConfig

    if CUDA:  # the compiled blocks; only the runtime knobs change
        return {
            "split": LaunchConfig(),
            "resident": LaunchConfig(chunks_per_row=7, small_limit=0),
            "fallback": LaunchConfig(chunks_per_row=3, capacity=4),
        }
    return {
        "split": LaunchConfig(block=32, resolve_block=32, chunks_per_row=3),  # 9 blocks, 3 programs
        "resident": LaunchConfig(block=64, resolve_block=16, chunks_per_row=2, small_limit=0),
        "streamed": LaunchConfig(block=64, resolve_block=16, chunks_per_row=4, small_limit=0, resident=16),
        "fallback": LaunchConfig(block=16, resolve_block=64, chunks_per_row=5, capacity=4),
    }


def _wide_rows(gen):
    batch, vocab = WIDE_SHAPE
    logits = torch.randn(batch, vocab, generator=gen) * 2.5
    logits[0] = torch.randint(-3, 1, (vocab,), generator=gen).float()  # ties across blocks and chunks
    logits[1, : vocab // 2] = float("-inf")  # the first programs of this row see nothing
    logits[2] = torch.randn(vocab, generator=gen) * 0.02  # nearly flat: many candidates
    spikes = torch.randint(0, vocab, (batch, 3), generator=gen)
    logits.scatter_add_(1, spikes, torch.full((batch, 3), 6.0))  # peaked rows, like an LM's
    return logits.to(DEVICE)


@pytest.mark.parametrize("path", ["split", "resident", "streamed", "fallback"])
def test_wide_rows_split_over_programs_draw_the_reference_token(path):
    """Every resolve path of the Triton sampler (all pairs compared on few candidates, searches on more, in
    registers or streamed, the whole row when the candidates fall short) gives the reference's token."""
    _skip_unless_runnable("triton")
    if path not in _launch_configs():
        pytest.skip("the compiled resident block is fixed: the streamed candidate path needs > 2048 of them")
    from hfdist.kernels._triton_sampling import sample_triton

    gen = torch.Generator().manual_seed(5)
    logits = _wide_rows(gen)
    batch = logits.shape[0]
    options = _random_options(batch, gen)
    options["top_p"][:3] = torch.tensor([0.9, 0.95, 0.5], device=DEVICE)  # the special rows filter
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen).to(DEVICE)
    config = _launch_configs()[path]
    for dtype in [torch.bfloat16, torch.float32] if CUDA else [torch.bfloat16]:
        x = logits.to(dtype)
        seen = {}
        tokens, status = sample_triton(x, seeds=seeds, config=config, diagnostics=seen, **options)
        assert torch.equal(tokens, sample(x, seed=seeds, backend="torch", **options))
        assert not status.any()
        assert 1 < seen["chunks_per_row"] <= (config.chunks_per_row or seen["chunks_per_row"])  # split rows
        # The configuration took the path it is named for, on some rows at least.
        kept = seen["bins"] >= 0
        if path == "split":  # candidates on some rows, few enough for the all-pairs resolve on some
            assert kept.any() and (seen["candidates"][kept] <= config.small_limit).any()
        elif path in ("resident", "streamed"):  # searches: more candidates than the all-pairs limit (0)
            assert (seen["candidates"][kept] > (config.resident if path == "streamed" else 1)).any()
        else:  # more candidates than the capacity: none kept, the row is searched
            assert (~kept[:3]).any()


def test_llama_vocabulary_top_p_rows():
    """V = 128256 with the compiled blocks (in the interpreter too: four rows), peaked logits like an LM's:
    at top-p 0.95 the rows take each search path (in registers, streamed, the whole row when the kept set
    outgrows the candidate buffer), at 0.5 all of them hold candidates (some few enough to compare all pairs);
    bf16; the reference's tokens throughout."""
    _skip_unless_runnable("triton")
    from hfdist.kernels._triton_sampling import RESIDENT, sample_triton

    batch = 128 if CUDA else 4
    gen = torch.Generator().manual_seed(8)
    scale = torch.tensor([4.0, 3.5, 3.0, 4.0])[torch.arange(batch) % 4, None]  # 3.0: flat enough to overflow
    logits = torch.randn(batch, 128256, generator=gen) * scale
    logits.scatter_add_(1, torch.randint(0, 128256, (batch, 4), generator=gen), torch.full((batch, 4), 12.0))
    logits = logits.to(DEVICE, torch.bfloat16)
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen).to(DEVICE)
    seen = {}
    for top_p in (0.95, 0.5):
        tokens, status = sample_triton(
            logits, temperature=1.0, top_p=top_p, top_k=0, min_p=0.0, seeds=seeds, diagnostics=seen
        )
        assert torch.equal(tokens, sample(logits, top_p=top_p, seed=seeds, backend="torch"))
        n, kept = seen["candidates"].cpu(), seen["bins"].cpu() >= 0
        if top_p == 0.95:
            assert ((n > 64) & (n <= RESIDENT)).any() and (n > RESIDENT).any() and (~kept).any()
        else:
            assert kept.all() and (n <= 64).any()


def test_wide_rows_invalid_and_greedy_across_chunks():
    """Validity and the first argmax are reduced across the programs that share a row."""
    _skip_unless_runnable("triton")
    from hfdist.kernels._triton_sampling import sample_triton

    batch, vocab = 5, WIDE_SHAPE[1]
    config = _launch_configs()["split"]
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    logits[0, [3, vocab - 2]] = 50.0  # equal maxima in the first and the last chunk: the first wins
    logits[1, vocab - 1] = float("nan")  # invalid in the last program only
    logits[2, vocab // 2] = float("inf")
    logits[3] = float("-inf")
    logits[4, :-1] = float("-inf")  # only the last token is finite
    seeds = torch.arange(batch, device=DEVICE)
    greedy, status = sample_triton(
        logits, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seeds=seeds, config=config
    )
    assert greedy.tolist() == [3, -1, -1, -1, vocab - 1] and status.tolist() == [0, 1, 1, 1, 0]
    sampled, status = sample_triton(
        logits, temperature=1.0, top_p=0.9, top_k=0, min_p=0.0, seeds=seeds, config=config
    )
    assert (
        sampled[1:4].tolist() == [-1, -1, -1]
        and sampled[4] == vocab - 1
        and status.tolist() == [0, 1, 1, 1, 0]
    )
    assert sampled[0] in (3, vocab - 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance(backend):
    _skip_unless_runnable(backend)
    gen = torch.Generator().manual_seed(3)
    rows = (torch.randn(6, 500, generator=gen) * 3).to(DEVICE)
    kw = dict(top_p=0.9, top_k=50, temperature=0.8)
    seeds = torch.tensor([11, 22, 33, 44, 55, 66], device=DEVICE)
    alone = torch.stack(
        [sample(rows[i : i + 1], seed=seeds[i : i + 1], backend=backend, **kw)[0] for i in range(6)]
    )
    perm = torch.tensor([4, 0, 5, 2, 1, 3], device=DEVICE)
    together = sample(rows[perm], seed=seeds[perm], backend=backend, **kw)
    assert torch.equal(together, alone[perm])
    padded = torch.cat([rows, torch.zeros(3, 500, device=DEVICE)])
    mixed = sample(padded, seed=torch.cat([seeds, seeds[:3]]), backend=backend, **kw)
    assert torch.equal(mixed[:6], alone)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_rows_raise_or_flag(backend):
    _skip_unless_runnable(backend)
    logits = torch.randn(5, 64, device=DEVICE)
    logits[1, 7] = float("nan")
    logits[3] = float("-inf")
    logits[4, 2] = float("inf")
    logits[0, :60] = float("-inf")  # partly masked: still valid
    with pytest.raises(ValueError, match=r"row\(s\) 1, 3, 4 "):
        sample(logits, seed=0, backend=backend)
    with pytest.raises(ValueError, match=r"row\(s\) 1, 3, 4 "):
        sample(logits, temperature=0.0, backend=backend)
    tokens = sample(logits, seed=0, backend=backend, on_invalid="flag", top_p=0.9)
    assert tokens[[1, 3, 4]].tolist() == [-1, -1, -1]
    assert 60 <= tokens[0] < 64 and 0 <= tokens[2] < 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_generators_and_module(backend):
    _skip_unless_runnable(backend)
    logits = torch.randn(4, 128, device=DEVICE)
    same = [sample(logits, seed=5, backend=backend, top_p=0.95) for _ in range(2)]
    assert torch.equal(*same)
    assert torch.equal(
        sample(logits, seed=5, backend=backend),
        sample(logits, seed=torch.full((4,), 5, device=DEVICE), backend=backend),
    )
    draws = [
        sample(logits, generator=torch.Generator(device=DEVICE).manual_seed(9), backend=backend)
        for _ in range(2)
    ]
    assert torch.equal(*draws)
    assert torch.equal(Sampler(top_p=0.95, backend=backend)(logits, seed=5), same[0])
    many = sample(logits[:1].expand(64, -1), seed=sampling_seeds(1, 0, 64, DEVICE), backend=backend)
    assert many.unique().numel() > 20  # per-row seeds give independent rows


def test_option_validation_and_seed_helper():
    logits = torch.randn(2, 10)
    for bad in [dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-1), dict(min_p=2.0), dict(top_k=2.5)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            sample(logits, **bad)
    with pytest.raises(ValueError, match="not both"):
        sample(logits, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(logits[0])
    seeds = sampling_seeds(7, 3, 4)
    assert seeds.dtype == torch.int64 and seeds.unique().numel() == 4
    assert not torch.equal(seeds, sampling_seeds(7, 4, 4))
    assert 2**MASS_BITS * 128256 < 2**53  # the integer masses stay exact in fp64
    assert math.isfinite(float(sample(logits, temperature=1e-6, seed=0)[0]))


@pytest.mark.parametrize("vocab,width", [(40, 8), (300, 16), (5000, 256)])
def test_candidate_path_draws_the_full_sort_token(vocab, width):
    """sample_torch decides rows on their top-``width`` logits; it must give the full sort's token, ties included.

    Small integer-valued logits make tie groups cross every boundary (the k-th value, the top-p prefix and
    the candidate edge), so both the exact candidate rows and the fall-back rows are exercised.
    """
    from hfdist.kernels.sampling import _sample_by_sort, sample_torch

    gen = torch.Generator().manual_seed(vocab)
    batch = 64
    for trial in range(6):
        if trial % 2:
            logits = torch.randint(-6, 3, (batch, vocab), generator=gen).float()  # many ties
        else:
            logits = torch.randn(batch, vocab, generator=gen) * (1 + trial)  # sharp to flat
        logits[:4, : vocab // 3] = float("-inf")
        top_k = torch.randint(0, min(vocab, 2 * width), (batch,), generator=gen)
        top_k[::5] = 0
        top_p = torch.rand(batch, generator=gen) * 1.2
        top_p = torch.where(top_p > 1, 1.0, top_p)
        min_p = torch.where(torch.rand(batch, generator=gen) < 0.3, 0.05, 0.0)
        temperature = torch.rand(batch, generator=gen) + 0.3
        random53 = torch.randint(0, 2**53, (batch,), generator=gen)
        options = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        fast = sample_torch(logits, **options, random53=random53, candidates=width)
        full = _sample_by_sort(logits, **options, random53=random53)
        greedy = top_k == 1
        assert torch.equal(fast[~greedy], full[~greedy]), (trial, (fast != full).nonzero().flatten().tolist())
