"""The vocabulary-parallel fused loss against the unsharded op, on real gloo groups of 2 and 3 ranks.

One spawn of 3 processes runs every case: the 3-rank cases on the whole group (V=1031, torch.chunk split
344 + 344 + 343), the 2-rank cases on a subgroup of ranks 0 and 1 (V=257: 129 + 128). Each rank builds the
same inputs, runs the sharded op on its shard and the unsharded op on the whole head, and asserts: loss,
entropy, d_hidden and the concatenated d_weight (and d_bias) shards against the unsharded op, the loss and
entropy bitwise the same on every rank, and for bf16 the error against fp64 no worse than the unsharded
op's. Rank 0 writes the worst figures over the ranks to a JSON file, which the test prints.
"""

import json
import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hfdist.kernels import fused_linear_cross_entropy, vocab_parallel_fused_linear_cross_entropy

N, H, CHUNK = 19, 24, 8  # 3 chunks, the last one short
VOCAB = {2: 257, 3: 1031}
OPTIONS = [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)]  # the second one with a bias too
CASES = [
    dict(world=world, reduction=reduction, options=i, dtype=dtype, backend=backend)
    for world in (2, 3)
    for reduction in ("mean", "sum", "none")
    for i in range(len(OPTIONS))
    for dtype in ("float32", "bfloat16")
    for backend in ("torch", "triton")
]
# Sharded vs unsharded (relative norm; entropy: max abs). bf16: the shard's logits come from a narrower GEMM
# (1-ulp bf16 differences) and d_hidden's partial sums are added in bf16 by the all-reduce.
TOLERANCE = {
    "float32": dict(loss=2e-6, entropy=1e-5, d_hidden=2e-6, d_weight=2e-6, d_bias=2e-6),
    "bfloat16": dict(loss=1e-4, entropy=1e-4, d_hidden=1e-2, d_weight=1e-3, d_bias=1e-3),
}


def _inputs(dtype, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(vocab, H, generator=gen) / math.sqrt(H) * 2.0
    bias = torch.randn(vocab, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (N,), generator=gen)
    labels[::5] = -100
    upstream = torch.randn(N, generator=gen)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, upstream


def _fp64_reference(hidden, weight, bias, labels, reduction, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The documented definition in fp64 (loss, entropy)."""
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    z = softcap * torch.tanh(logits / softcap) if softcap else logits
    valid = labels != -100
    lse = torch.logsumexp(z, -1)
    z_y = z.gather(-1, torch.where(valid, labels, 0)[:, None]).squeeze(-1)
    loss = (1 - label_smoothing) * (lse - z_y) + label_smoothing * (lse - z.mean(-1)) + z_loss * lse**2
    loss = torch.where(valid, loss, 0.0)
    entropy = torch.where(valid, torch.distributions.Categorical(logits=z.detach()).entropy(), 0.0)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / valid.sum()
    return loss, entropy


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _shard_range(vocab, world, rank):
    sizes = [len(c) for c in torch.arange(vocab).chunk(world)]
    return sizes, sum(sizes[:rank]), sum(sizes[: rank + 1])


def _gather_rows(local, sizes, group):
    """The concatenation of every rank's [V_r, ...] rows (uneven V_r: padded for all_gather)."""
    padded = local.new_zeros((max(sizes),) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)])


def _same_on_every_rank(t, group):
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return all(torch.equal(p, t) for p in pieces)


def _run(fn, hidden, weight, bias, labels, upstream, reduction, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    loss, entropy = fn(h, w, labels, b, reduction=reduction, **kw)
    scale = upstream if reduction == "none" else upstream[0]
    (loss * scale.to(loss.dtype)).sum().backward()
    return loss.detach(), entropy.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _case(rank, group, seed, case):
    world, reduction, backend = case["world"], case["reduction"], case["backend"]
    dtype = getattr(torch, case["dtype"])
    options = OPTIONS[case["options"]]
    vocab = VOCAB[world]
    hidden, weight, bias, labels, upstream = _inputs(dtype, vocab, seed)
    bias = bias if case["options"] == 1 else None
    sizes, start, stop = _shard_range(vocab, world, rank)
    kw = dict(return_entropy=True, backend=backend, chunk_size=CHUNK, **options)

    def unsharded(h, w, y, b, **k):
        return fused_linear_cross_entropy(h, w, y, bias=b, **k)

    def sharded(h, w, y, b, **k):
        return vocab_parallel_fused_linear_cross_entropy(
            h, w, y, vocab_start=start, vocab_size=vocab, group=group, bias_shard=b, **k
        )

    ref = _run(unsharded, hidden, weight, bias, labels, upstream, reduction, **kw)
    got = _run(
        sharded,
        hidden,
        weight[start:stop],
        None if bias is None else bias[start:stop],
        labels,
        upstream,
        reduction,
        **kw,
    )
    assert _same_on_every_rank(got[0], group) and _same_on_every_rank(got[1], group), case
    assert _same_on_every_rank(got[2], group), case  # d_hidden: summed inside the op
    d_weight = _gather_rows(got[3], sizes, group)
    assert got[3].dtype == dtype and got[2].dtype == dtype
    figures = {
        "loss": _rel(got[0], ref[0]),
        "entropy": (got[1].double() - ref[1].double()).abs().max().item(),
        "d_hidden": _rel(got[2], ref[2]),
        "d_weight": _rel(d_weight, ref[3]),
    }
    if bias is not None:
        figures["d_bias"] = _rel(_gather_rows(got[4], sizes, group), ref[4])
    for name, value in figures.items():
        assert value <= TOLERANCE[case["dtype"]][name], (case, name, value)
    if dtype == torch.bfloat16:  # against fp64: the sharded op is no worse than the unsharded one
        h64 = hidden.double().requires_grad_()
        w64 = weight.double().requires_grad_()
        loss64, ent64 = _fp64_reference(
            h64, w64, None if bias is None else bias.double(), labels, reduction, **options
        )
        scale = upstream if reduction == "none" else upstream[0]
        (loss64 * scale.double()).sum().backward()
        for name, ours, theirs, exact in [
            ("loss", got[0], ref[0], loss64.detach()),
            ("d_hidden", got[2], ref[2], h64.grad),
            ("d_weight", d_weight, ref[3], w64.grad),
        ]:
            err, ref_err = _rel(ours, exact), _rel(theirs, exact)
            figures[f"{name} vs fp64"] = err
            figures[f"{name} vs fp64 (unsharded)"] = ref_err
            assert err <= ref_err + 2e-3, (case, name, err, ref_err)
    return figures


def _special_cases(rank, group, world, backend):
    """Labels outside [0, V) give NaN where the unsharded op does; no_grad computes the same loss."""
    vocab = VOCAB[world]
    hidden, weight, _, labels, _ = _inputs(torch.float32, vocab, seed=99)
    labels[1], labels[2], labels[3] = (
        vocab,
        -5,
        vocab - 1,
    )  # out of range, out of range, last shard's last class
    sizes, start, stop = _shard_range(vocab, world, rank)
    w = weight[start:stop].clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    loss = vocab_parallel_fused_linear_cross_entropy(
        h,
        w,
        labels,
        vocab_start=start,
        vocab_size=vocab,
        group=group,
        reduction="none",
        backend=backend,
        chunk_size=CHUNK,
    )
    ref = fused_linear_cross_entropy(
        hidden, weight, labels, reduction="none", backend=backend, chunk_size=CHUNK
    )
    assert torch.equal(torch.isnan(loss), torch.isnan(ref)) and torch.isnan(loss[1:3]).all()
    torch.testing.assert_close(loss[~torch.isnan(loss)], ref[~torch.isnan(ref)], rtol=2e-6, atol=2e-6)
    loss.sum().backward()
    assert torch.isnan(h.grad[1:3]).all() and not torch.isnan(h.grad[3:]).any()
    with torch.no_grad():
        quiet = vocab_parallel_fused_linear_cross_entropy(
            h,
            w,
            labels.clamp_min(0) % vocab,
            vocab_start=start,
            vocab_size=vocab,
            group=group,
            backend=backend,
            chunk_size=CHUNK,
        )
    expected = fused_linear_cross_entropy(
        hidden, weight, labels.clamp_min(0) % vocab, backend=backend, chunk_size=CHUNK
    )
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, expected, rtol=2e-6, atol=2e-6)


def _worker(rank, init_file, out_file):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    try:
        groups = {3: dist.group.WORLD, 2: dist.new_group([0, 1])}  # every rank takes part in new_group
        figures = {}
        for seed, case in enumerate(CASES):
            group = groups[case["world"]]
            if rank >= case["world"]:
                continue
            values = _case(rank, group, seed, case)
            worst = torch.tensor(list(values.values()), dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
            figures["{world} ranks, {reduction}, options {options}, {dtype}, {backend}".format(**case)] = (
                dict(zip(values, worst.tolist()))
            )
        for world in (2, 3):
            if rank < world:
                for backend in ("torch", "triton"):
                    _special_cases(rank, groups[world], world, backend)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(figures, f, indent=1)
    except BaseException:  # the parent shows every rank's error: the first to exit may only be a victim
        with open(f"{out_file}.rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_vocab_parallel_matches_unsharded(tmp_path, capsys):
    out_file = tmp_path / "figures.json"
    try:
        mp.spawn(_worker, args=(str(tmp_path / "store"), str(out_file)), nprocs=3, join=True)
    except mp.ProcessRaisedException:
        errors = sorted(tmp_path.glob("figures.json.rank*.err"))
        pytest.fail("\n".join(f"{e.name}:\n{e.read_text()}" for e in errors))
    figures = json.loads(out_file.read_text())
    assert len(figures) == len(CASES)
    worst = {}
    for values in figures.values():
        for name, value in values.items():
            worst[name] = max(worst.get(name, 0.0), value)
    per_dtype = {
        dtype: {
            name: max(v[name] for k, v in figures.items() if dtype in k and name in v)
            for name in TOLERANCE[dtype]
        }
        for dtype in TOLERANCE
    }
    with capsys.disabled():
        print("\nvocab-parallel vs unsharded, worst over cases and ranks:", json.dumps(per_dtype))
        print(
            "bf16 against fp64 (sharded / unsharded):",
            {k: round(v, 5) for k, v in worst.items() if "fp64" in k},
        )


def test_vocab_parallel_bad_input():
    hidden, weight, _, labels, _ = _inputs(torch.float32, 257, seed=0)
    with pytest.raises(ValueError, match="process group"):
        vocab_parallel_fused_linear_cross_entropy(
            hidden, weight[:100], labels, vocab_start=0, vocab_size=257, group=None
        )
    with pytest.raises(ValueError, match="vocab_start 200"):
        vocab_parallel_fused_linear_cross_entropy(
            hidden, weight[:100], labels, vocab_start=200, vocab_size=257, group=None
        )
    with pytest.raises(ValueError, match="grad_accumulation"):
        vocab_parallel_fused_linear_cross_entropy(
            hidden, weight[:100], labels, vocab_start=0, vocab_size=257, group=None, grad_accumulation="bf16"
        )
