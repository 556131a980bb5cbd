"""The citation blocker: its hash index against a dictionary, and blocking during real decoding."""

import random
from collections import defaultdict

import numpy as np
import pytest
import torch

from hfdist.errors import HfdistError
from hfdist.generation import CitationBlocker, generate, left_pad
from hfdist.testing import tiny_llama


def _reference_index(sequences, n):
    index = defaultdict(set)
    for seq in sequences:
        for i in range(len(seq) - n):
            index[tuple(seq[i : i + n])].add(seq[i + n])
    return index


@pytest.mark.parametrize("n", [1, 3, 5])
def test_index_matches_a_dictionary(n):
    rng = random.Random(n)
    # A small vocabulary makes many n-grams repeat with several continuations, and fills the hash table.
    sequences = [[rng.randrange(6) for _ in range(rng.randrange(0, 60))] for _ in range(300)]
    blocker = CitationBlocker(sequences, n=n)
    reference = _reference_index(sequences, n)
    assert blocker.num_ngrams == len(reference)
    assert blocker.max_next == max(len(v) for v in reference.values())
    queries = list(reference)[:200] + [tuple(rng.randrange(8) for _ in range(n)) for _ in range(200)]
    for q in queries:
        assert blocker.blocked_tokens(list(q)) == reference.get(q, set())


def test_block_sets_exactly_the_continuations_to_minus_inf():
    sequences = [[1, 2, 3, 4, 5, 6], [9, 2, 3, 4, 5, 7], [2, 3, 4, 5, 8, 1]]
    blocker = CitationBlocker(sequences, n=4)
    logits = torch.randn(3, 10)
    grams = torch.tensor([[2, 3, 4, 5], [3, 4, 5, 6], [0, 0, 0, 0]])
    out = blocker.block_(logits.clone(), grams)
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [6, 7, 8]
    assert torch.equal(out[1], logits[1]) and torch.equal(out[2], logits[2])  # unseen n-grams: untouched


def test_blocker_stops_a_model_from_continuing_its_training_sequence():
    model = tiny_llama(vocab_size=256, seed=0)
    n = 5
    ids, mask = left_pad([[10, 20, 30, 40], [7, 8, 9, 11, 12, 13]], 0)
    p = ids.shape[1]
    free = generate(model, ids, mask, max_new_tokens=30)
    # "Training data" = the model's own greedy continuations: without the blocker, greedy decoding quotes it
    # token for token; with it, the first n tokens are the same and then the quote must break.
    training = free[:, p:].tolist()
    blocker = CitationBlocker(training, n=n)
    blocked = generate(model, ids, mask, max_new_tokens=30, blocker=blocker)
    assert torch.equal(blocked[:, : p + n], free[:, : p + n])
    assert (blocked[:, p + n] != free[:, p + n]).all()
    # At every step, the chosen token is never a training continuation of the last n generated tokens.
    reference = _reference_index(training, n)
    for row in blocked[:, p:].tolist():
        for t in range(n, len(row)):
            assert row[t] not in reference.get(tuple(row[t - n : t]), set())


def test_ngrams_reaching_into_the_prompt_only_with_include_prompt():
    model = tiny_llama(vocab_size=256, seed=0)
    prompt = torch.tensor([[10, 20, 30, 40, 50, 60]])
    free = generate(model, prompt, max_new_tokens=3)
    first = int(free[0, 6])
    training = [[40, 50, 60, first]]  # the prompt's last 3 tokens, then the model's first choice
    default = generate(model, prompt, max_new_tokens=3, blocker=CitationBlocker(training, n=3))
    assert int(default[0, 6]) == first  # the n-gram is not inside the generated part: not blocked
    reaching = generate(
        model, prompt, max_new_tokens=3, blocker=CitationBlocker(training, n=3, include_prompt=True)
    )
    assert int(reaching[0, 6]) != first


def test_blocker_accepts_arrays_and_rejects_bad_input():
    array = np.array([[1, 2, 3, 4], [1, 2, 3, 5]], dtype=np.int32)
    assert CitationBlocker(array, n=3).blocked_tokens([0, 1, 2, 3]) == {4, 5}
    assert CitationBlocker(torch.from_numpy(array), n=3).blocked_tokens([1, 2, 3]) == {4, 5}
    assert CitationBlocker([[1, 2]], n=3).blocked_tokens([1, 2, 3]) == set()  # no n-gram at all
    with pytest.raises(HfdistError, match="blocker n"):
        CitationBlocker(array, n=0)
    with pytest.raises(HfdistError, match="2-D"):
        CitationBlocker(np.zeros(5, dtype=np.int64), n=2)
