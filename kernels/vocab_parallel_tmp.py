"""TEMPORARY (replaced by the loss helper's op at merge): a plain torch vocabulary-parallel cross-entropy."""
import torch
import torch.distributed as dist


class _VP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group):
        z = (hidden @ weight.t()).float()
        m = z.amax(1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(z - m[:, None])
        local = labels - vocab_start
        valid = labels != -100
        mine = valid & (local >= 0) & (local < weight.shape[0])
        zy = torch.where(mine, z.gather(1, local.clamp(0, weight.shape[0] - 1)[:, None])[:, 0], 0.0)
        stats = torch.stack([e.sum(1), (e * (z - m[:, None])).sum(1), zy])
        dist.all_reduce(stats, group=group)
        s, t, zy = stats
        lse = m + torch.log(s)
        loss = torch.where(valid, lse - zy, 0.0)
        entropy = torch.where(valid, torch.log(s) - t / s, 0.0)
        p = e / s[:, None]
        p[mine, local[mine]] -= 1
        p = p * valid[:, None]
        ctx.save_for_backward(hidden, weight, p.to(hidden.dtype))
        ctx.group = group
        ctx.mark_non_differentiable(entropy)
        return loss.sum(), entropy

    @staticmethod
    def backward(ctx, grad, _):
        hidden, weight, p = ctx.saved_tensors
        d_x = p * grad.to(p.dtype)
        d_h = d_x @ weight
        dist.all_reduce(d_h, group=ctx.group)
        return d_h, d_x.t() @ hidden, None, None, None


def vocab_parallel_fused_linear_cross_entropy(hidden, weight_shard, labels, *, vocab_start, vocab_size, group,
                                              bias_shard=None, reduction="sum", softcap=None, return_entropy=True,
                                              backend="auto", **_):
    assert reduction == "sum" and softcap is None and bias_shard is None and return_entropy
    return _VP.apply(hidden, weight_shard, labels, vocab_start, group)
