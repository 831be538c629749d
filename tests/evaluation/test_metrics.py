from __future__ import annotations

import math

import pytest

from phds.evaluation.agreement import agreement, agreement_matrix
from phds.evaluation.metrics import bootstrap_ci, last_number, paired_difference, summarise, value


def test_accuracy_and_perplexity_values():
    assert value("acc", {"acc": [1, 0, 1, 1]}) == 0.75
    assert value("ppl", {"nll": [2.0, 4.0], "tokens": [2, 2]}) == pytest.approx(math.exp(1.5))


def test_bootstrap_ci_is_seeded_and_brackets_the_value():
    columns = {"acc": [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]}
    assert bootstrap_ci("acc", columns, seed=3) == bootstrap_ci("acc", columns, seed=3)
    summary = summarise("acc", columns, seed=0)
    assert 0.0 <= summary["ci_low"] <= summary["value"] <= summary["ci_high"] <= 1.0
    assert summary["ci_low"] < summary["ci_high"] and summary["n"] == 10


def test_paired_difference_marks_identical_models_not_significant():
    columns = {"acc": [1, 0, 1, 1, 0]}
    same = paired_difference("acc", columns, columns)
    assert same["diff"] == 0.0 and not same["significant"]
    better = paired_difference("acc", {"acc": [1] * 40}, {"acc": [0] * 30 + [1] * 10})
    assert better["diff"] == 0.75 and better["significant"] and better["ci_low"] > 0


def test_paired_difference_needs_the_same_items_and_a_known_metric():
    with pytest.raises(ValueError, match="same items"):
        paired_difference("acc", {"acc": [1, 0]}, {"acc": [1]})
    with pytest.raises(ValueError, match="`metric` must be one of"):
        value("f1", {"f1": [1]})


def test_last_number_extracts_the_final_answer():
    assert last_number("3 + 4 = 7, so she pays $1,250.") == "1250"
    assert last_number("-2.50 is the answer") == "-2.5"
    assert last_number("no digits") is None


def test_agreement_matrix_is_symmetric_with_ones_on_the_diagonal():
    result = agreement_matrix({1: [0, 1, 2, 0], 2: [0, 1, 1, 0], 4: [1, 1, 1, 0]})
    matrix = result["matrix"]
    assert result["ks"] == [1, 2, 4]
    assert all(matrix[i][i] == 1.0 for i in range(3))
    assert all(matrix[i][j] == matrix[j][i] for i in range(3) for j in range(3))
    assert matrix[0][1] == 0.75 and matrix[0][2] == 0.5


def test_positionwise_agreement_counts_positions_not_items():
    assert agreement([[1, 2, 3], [4]], [[1, 2, 0], [4]], positionwise=True) == 0.75
    assert agreement([[1, 2, 3], [4]], [[1, 2, 0], [4]]) == 0.5
