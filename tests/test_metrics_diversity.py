"""Generation metrics against hand-computed values, sacrebleu, and a brute-force overlap."""

import random

import numpy as np
import pytest
import sacrebleu

from hfdist import metrics as M
from hfdist.errors import HfdistError


def test_type_token_ratio_by_hand():
    assert M.type_token_ratio([1, 1, 2, 3]) == 3 / 4
    # Only the last `window` tokens count: [2, 2, 2] -> 1/3, whatever came before.
    assert M.type_token_ratio([5, 6, 7, 2, 2, 2], window=3) == pytest.approx(1 / 3)
    assert M.type_token_ratio(list(range(200)), window=96) == 1.0
    assert M.type_token_ratio([]) == 0.0
    assert M.word_type_token_ratio("the cat saw the dog", window=96) == 4 / 5
    assert M.word_type_token_ratio("a b a b c", window=2) == 1.0
    with pytest.raises(HfdistError, match="window"):
        M.type_token_ratio([1], window=0)


def test_ttr_over_position_is_the_sliding_window():
    seq = [1, 1, 2, 3, 3, 3]
    assert M.ttr_over_position(seq, 3) == pytest.approx([2 / 3, 1.0, 2 / 3, 1 / 3])
    assert M.ttr_over_position(seq, 7) == []
    rng = random.Random(0)
    long = [rng.randrange(30) for _ in range(300)]
    curve = M.ttr_over_position(long, 96)
    assert len(curve) == 300 - 96 + 1
    assert curve == pytest.approx([M.type_token_ratio(long[: i + 96], 96) for i in range(len(curve))])
    assert M.mean_ttr_over_position([seq, [1, 2, 3]], 3) == pytest.approx(
        [(2 / 3 + 1) / 2, 1.0, 2 / 3, 1 / 3]
    )


def test_distinct_n_and_repetition_rate_by_hand():
    assert M.distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # bigrams 12 21 12
    assert M.distinct_n([[1, 2], [1, 2], [2, 1]], 1) == pytest.approx(2 / 6)
    assert M.distinct_n([[1, 2], [1, 2, 3]], 2) == pytest.approx(2 / 3)  # 12 | 12 23
    assert M.distinct_n([[1]], 2) == 0.0
    # [1 2 1 2 1]: bigrams 12 21 12 21 -> 2 unique of 4 -> 0.5; [3 4 5] -> 0; mean 0.25
    assert M.repetition_rate([[1, 2, 1, 2, 1], [3, 4, 5]], n=2) == pytest.approx(0.25)
    assert M.repetition_rate([[1, 2]], n=4) == 0.0


def _sacre_self_bleu(gens, smooth="exp"):
    words = [" ".join(map(str, g)) for g in gens]
    return np.mean(
        [
            sacrebleu.sentence_bleu(
                w, words[:i] + words[i + 1 :], smooth_method=smooth, tokenize="none"
            ).score
            / 100
            for i, w in enumerate(words)
        ]
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_bleu_equals_sacrebleu(seed):
    rng = random.Random(seed)
    # Short sequences (effective order, brevity penalty), shared chunks (high-order matches), a duplicate.
    chunk = [rng.randrange(40) for _ in range(12)]
    gens = [[rng.randrange(15) for _ in range(rng.randrange(1, 30))] for _ in range(8)]
    gens += [chunk + [rng.randrange(40) for _ in range(5)], [7] + chunk, list(gens[0])]
    assert M.self_bleu(gens) == pytest.approx(_sacre_self_bleu(gens), abs=1e-12)
    assert M.self_bleu(gens, smoothing="none") == pytest.approx(_sacre_self_bleu(gens, "none"), abs=1e-12)


def test_sentence_bleu_equals_sacrebleu_and_edge_cases():
    hyp, refs = [1, 2, 3, 4, 5, 6], [[1, 2, 3, 4, 9, 9, 9], [2, 3, 4, 5]]
    expected = (
        sacrebleu.sentence_bleu("1 2 3 4 5 6", ["1 2 3 4 9 9 9", "2 3 4 5"], tokenize="none").score / 100
    )
    assert M.sentence_bleu(hyp, refs) == pytest.approx(expected, abs=1e-12)
    assert M.sentence_bleu([1, 2, 3, 4], [[1, 2, 3, 4]]) == pytest.approx(1.0)
    assert M.sentence_bleu([1, 2], [[3, 4]]) == 0.0
    assert M.self_bleu([[1, 2, 3, 4, 5]] * 3) == pytest.approx(1.0)
    with pytest.raises(HfdistError, match="at least 2"):
        M.self_bleu([[1, 2, 3]])
    with pytest.raises(HfdistError, match="smoothing"):
        M.self_bleu([[1], [2]], smoothing="floor")


def _brute_longest_run(gen, training):
    best = 0
    for row in training:
        row = list(row)
        for i in range(len(gen)):
            for j in range(len(row)):
                k = 0
                while i + k < len(gen) and j + k < len(row) and gen[i + k] == row[j + k]:
                    k += 1
                best = max(best, k)
    return best


def test_longest_common_runs_by_hand_and_brute_force():
    training = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 9, 9, 9, 9]])
    # A run never crosses two training rows: [7 8 9 9] shares 2 (7 8) and 2 (9 9), not 4.
    gens = [[0, 2, 3, 4, 0], [9] * 11, [7, 8, 9, 9], [], [42]]
    assert M.longest_common_runs(gens, training) == [3, 8, 2, 0, 0]
    rng = np.random.default_rng(0)
    train = rng.integers(0, 4, size=(6, 20))
    gens = [rng.integers(0, 4, size=int(rng.integers(1, 25))).tolist() for _ in range(10)]
    gens.append(train[2, 3:17].tolist() + [0, 1])  # a 14-token quote
    assert M.longest_common_runs(gens, train) == [_brute_longest_run(g, train) for g in gens]


def test_dataset_overlap_share_over_min_run():
    training = np.arange(100).reshape(2, 50)
    gens = [list(range(5, 20)), list(range(60, 70)) + [0], [1000, 1001]]  # runs 15, 10, 0
    result = M.dataset_overlap(gens, training, min_run=10)
    assert result["longest_runs"] == [15, 10, 0]
    assert result["share_over_min_run"] == pytest.approx(1 / 3)  # only 15 > 10
    assert result["max_longest_run"] == 15 and result["mean_longest_run"] == pytest.approx(25 / 3)


def test_generation_metrics_collects_every_metric():
    gens = [[1, 2, 3, 4, 5], [1, 2, 3, 9, 9], [7, 7, 7, 7, 7]]
    out = M.generation_metrics(gens, texts=["a b", "a a", "c"], training=[[1, 2, 3, 4]], window=96, min_run=2)
    assert out["ttr96"] == pytest.approx((1 + 4 / 5 + 1 / 5) / 3)
    assert out["self_bleu"] == pytest.approx(M.self_bleu(gens))
    assert out["word_ttr96"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["overlap_share_over_2"] == pytest.approx(2 / 3)
    assert out["overlap_max_longest_run"] == 4
