"""Cross-sparsity agreement: for every pair (k, k') the share of items whose prediction is the same.

Predictions are stored once per k (one pass per k) and compared here; nothing is re-run per pair. A prediction is
the argmax choice (multiple choice), the extracted final answer (generation), the greedy continuation (LAMBADA), or,
for text, the list of top-1 next tokens at every scored position: there agreement is the share of positions whose
top-1 token agrees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def agreement(a: Sequence[Any], b: Sequence[Any], *, positionwise: bool = False) -> float:
    """Share of items (or, with `positionwise`, of positions in per-item token lists) predicted the same.

    Example: `agreement([0, 1, 2], [0, 1, 3]) == 2 / 3`.
    """
    if len(a) != len(b):
        raise ValueError(f"agreement needs predictions on the same items, got {len(a)} and {len(b)}")
    if positionwise:
        pairs = [(x, y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True)]
    else:
        pairs = list(zip(a, b, strict=True))
    if not pairs:
        raise ValueError("agreement of zero items is undefined")
    return sum(x == y for x, y in pairs) / len(pairs)


def agreement_matrix(predictions: Mapping[Any, Sequence[Any]], *, positionwise: bool = False) -> dict[str, Any]:
    """`{"ks": [...], "matrix": [[...]]}` of pairwise agreement between the per-k (or per-model) predictions.

    The matrix is symmetric with ones on the diagonal.

    Example: `agreement_matrix({1: [0, 1], 2: [0, 0]})["matrix"] == [[1.0, 0.5], [0.5, 1.0]]`.
    """
    keys = list(predictions)
    matrix = [[1.0] * len(keys) for _ in keys]
    for i, ki in enumerate(keys):
        for j in range(i + 1, len(keys)):
            share = agreement(predictions[ki], predictions[keys[j]], positionwise=positionwise)
            matrix[i][j] = matrix[j][i] = share
    return {"ks": keys, "matrix": matrix}
