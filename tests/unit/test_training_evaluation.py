"""tuneserve.training.evaluation: the Matthews correlation coefficient."""

from __future__ import annotations

import math

import pytest

from tuneserve.training.evaluation import matthews_correlation


def binary_mcc(truth: list[int], predicted: list[int]) -> float:
    """The textbook two-class formula, (TP*TN - FP*FN) / sqrt(...)."""
    pairs = list(zip(truth, predicted, strict=True))
    tp = pairs.count((1, 1))
    tn = pairs.count((0, 0))
    fp = pairs.count((0, 1))
    fn = pairs.count((1, 0))
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


@pytest.mark.parametrize(
    "truth", [[0, 1, 0, 1], [0, 0, 0, 1, 1], [2, 0, 1, 1, 2, 0, 0], [3, 7, 3, 7, 7]]
)
def test_perfect_predictions_score_one(truth: list[int]) -> None:
    assert matthews_correlation(truth, list(truth)) == pytest.approx(1.0)


@pytest.mark.parametrize("truth", [[0, 1, 0, 1], [0, 0, 0, 1], [1, 1, 0, 1, 0]])
def test_inverted_binary_predictions_score_minus_one(truth: list[int]) -> None:
    assert matthews_correlation(truth, [1 - t for t in truth]) == pytest.approx(-1.0)


@pytest.mark.parametrize("constant", [0, 1])
def test_constant_prediction_scores_zero(constant: int) -> None:
    # CoLA's trap: always answering the majority class is 75% accurate but worth nothing.
    truth = [1, 1, 1, 0]
    assert matthews_correlation(truth, [constant] * 4) == 0.0


def test_one_class_everywhere_is_zero_not_a_division_error() -> None:
    assert matthews_correlation([1, 1, 1], [1, 1, 1]) == 0.0
    assert matthews_correlation([], []) == 0.0


def test_binary_value_matches_the_textbook_formula() -> None:
    truth = [1, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0]
    predicted = [1, 0, 1, 1, 0, 1, 0, 1, 0, 0, 0, 1]
    expected = binary_mcc(truth, predicted)
    assert 0.0 < expected < 1.0
    assert matthews_correlation(truth, predicted) == pytest.approx(expected)


def test_known_multi_class_value() -> None:
    # Three classes, two rows each, half right: correct c=3, s=6, t_k = p_k = (2, 2, 2).
    # (c*s - sum t_k p_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)) = (18-12)/24 = 0.25
    truth = [0, 0, 1, 1, 2, 2]
    predicted = [0, 1, 1, 2, 2, 0]
    assert matthews_correlation(truth, predicted) == pytest.approx(0.25)


def test_unbalanced_multi_class_value() -> None:
    # c=3, s=5, t_k=(2, 2, 1), p_k=(1, 2, 2): (15 - 8) / sqrt((25 - 9) * (25 - 9)) = 7/16
    truth = [0, 0, 1, 1, 2]
    predicted = [0, 1, 1, 2, 2]
    assert matthews_correlation(truth, predicted) == pytest.approx(7 / 16)


def test_a_predicted_class_absent_from_the_truth_counts() -> None:
    # Predicting class 2, never in the truth: c=3, s=4, t=(2, 2, 0), p=(1, 2, 1)
    # (12 - 6) / sqrt((16 - 6) * (16 - 8)) = 6 / sqrt(80)
    truth = [0, 0, 1, 1]
    predicted = [0, 2, 1, 1]
    assert matthews_correlation(truth, predicted) == pytest.approx(6 / math.sqrt(80))


def test_symmetric_in_truth_and_prediction() -> None:
    truth = [0, 1, 2, 2, 1, 0, 1]
    predicted = [0, 2, 2, 1, 1, 0, 0]
    assert matthews_correlation(truth, predicted) == pytest.approx(
        matthews_correlation(predicted, truth)
    )
