"""The degeneration measures of generated images, against values counted by hand."""

import numpy as np
import pytest
import torch

from hfdist.errors import HfdistError
from hfdist.metrics import distinct_tokens, image_completion_metrics, repeated_row_fraction


def test_distinct_tokens():
    assert distinct_tokens([5, 5, 5, 5]) == 1  # flat colour
    assert distinct_tokens([1, 2, 1, 3, 2]) == 3
    assert distinct_tokens([]) == 0


def test_repeated_row_fraction_counts_rows_equal_to_the_row_above():
    # Width 3, four generated rows: A B B A -> row 2 repeats row 1 (B B), the others differ: 1 of 3 pairs.
    a, b = [1, 2, 3], [4, 4, 4]
    assert repeated_row_fraction(a + b + b + a, 3) == pytest.approx(1 / 3)
    # With the context's last row (= A) above the first generated row: pairs (A,A) (A,B) (B,B) (B,A): 2 of 4.
    assert repeated_row_fraction(a + b + b + a, 3, row_above=a) == pytest.approx(2 / 4)
    # Stripes: every row the same as the one above.
    assert repeated_row_fraction(b * 5, 3, row_above=b) == 1.0
    # A trailing partial row is not a row; a single row without a row above gives no pair.
    assert repeated_row_fraction(a + a + [1], 3) == 1.0
    assert repeated_row_fraction(a, 3) == 0.0


def test_repeated_row_fraction_errors():
    with pytest.raises(HfdistError, match="width"):
        repeated_row_fraction([1, 2], 0)
    with pytest.raises(HfdistError, match="row_above: expected 3 tokens, got 2"):
        repeated_row_fraction([1, 2, 3], 3, row_above=[1, 2])


def test_image_completion_metrics_by_hand():
    width = 2
    # Contexts: the start token (9) and one row of 2 pixels.
    contexts = torch.tensor([[9, 1, 1], [9, 3, 4]])
    generations = [
        [1, 1, 1, 1, 2, 2],  # rows (1,1) (1,1) (2,2) after context row (1,1): repeats 2 of 3; colours {1,2}
        [5, 6, 7, 8, 5, 6],  # rows (5,6) (7,8) (5,6) after (3,4): repeats 0 of 3; colours {5,6,7,8}
    ]
    m = image_completion_metrics(generations, contexts, width, window=4)
    assert m["distinct_colors"] == pytest.approx((2 + 4) / 2)
    assert m["repeated_rows"] == pytest.approx((2 / 3 + 0) / 2)
    # TTR over the last 4 tokens: [1, 1, 2, 2] -> 2/4; [7, 8, 5, 6] -> 4/4.
    assert m["ttr4"] == pytest.approx((0.5 + 1.0) / 2)
    # Without contexts the first generated row has no row above: (1,1)(1,1)(2,2) -> 1 of 2 pairs.
    assert image_completion_metrics(generations, None, width, 4)["repeated_rows"] == pytest.approx(
        (1 / 2 + 0) / 2
    )
    assert image_completion_metrics(np.array(generations), contexts.numpy(), width, 4) == m
