"""Held-out next-token statistics and the greedy-TTR protocol on a real tiny Llama."""

import math

import pytest
import torch

from hfdist import metrics as M
from hfdist.errors import HfdistError
from hfdist.generation import generate
from hfdist.testing import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=128, seed=4)


def test_heldout_stats_equal_a_direct_computation(model):
    ids = torch.randint(3, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding on one row: its last 5 tokens are neither inputs nor targets
    stats = M.heldout_stats(model, ids, mask, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0][keep]
    p = logp.exp()
    entropy = -(p * logp).sum(-1)[keep]
    top = p.sort(-1, descending=True).values.cumsum(-1)[keep]
    assert stats["num_tokens"] == 16 + 11 + 16
    assert stats["loss"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert stats["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert stats["entropy"] == pytest.approx(entropy.mean().item(), rel=1e-5)
    for k in (1, 3, 5):
        assert stats[f"top{k}_mass"] == pytest.approx(top[:, k - 1].mean().item(), rel=1e-5)
    # A random model is near-uniform over 128 tokens: entropy close to log(128), little top-1 mass.
    assert 0.9 * math.log(128) < stats["entropy"] <= math.log(128)
    assert stats["top1_mass"] < stats["top3_mass"] < stats["top5_mass"] < 0.2


def test_heldout_stats_rejects_empty_input(model):
    with pytest.raises(HfdistError, match="no predicted tokens"):
        M.heldout_stats(model, torch.tensor([[5]]))


def test_greedy_ttr_is_the_upstream_protocol(model):
    contexts = torch.randint(3, 128, (3, 32), generator=torch.Generator().manual_seed(1))
    result = M.greedy_ttr(model, contexts, total_len=160, window=96, batch_size=2)
    out = generate(model, contexts, max_new_tokens=128)
    expected = [M.type_token_ratio(row, 96) for row in out[:, 32:].tolist()]
    assert result["generations"] == out[:, 32:].tolist()
    assert all(len(g) == 128 for g in result["generations"])
    assert result["ttr96_per_context"] == pytest.approx(expected)
    assert result["ttr96"] == pytest.approx(sum(expected) / 3)
    with pytest.raises(HfdistError, match="total_len"):
        M.greedy_ttr(model, contexts, total_len=32)
