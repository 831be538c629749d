"""Metrics from per-item columns, 95% bootstrap confidence intervals, and paired bootstrap differences.

Every metric is computed from per-item columns stored in results.json, so a CI (resample items) and a paired
difference (resample the same items for both models) use the same code:

- `acc`, `acc_norm`, `exact_match`: the mean of a 0/1 column of the same name.
- `ppl`: `exp(sum(nll) / sum(tokens))` over the `nll` and `tokens` columns (token-level perplexity for text; for
  LAMBADA `tokens` is 1 per item, i.e. lm-evaluation-harness's `exp(-mean(loglikelihood))`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from phds.evaluation.tasks import normalise_number

N_RESAMPLES = 1000
CONFIDENCE = 0.95

# metric -> higher is better
METRICS: dict[str, bool] = {"acc": True, "acc_norm": True, "exact_match": True, "ppl": False}
# the headline metric of each task kind (tables, frontier, agreement context)
PRIMARY: dict[str, str] = {
    "mc": "acc_norm",
    "winogrande": "acc",
    "lambada": "acc",
    "gsm8k": "exact_match",
    "exact_match": "exact_match",
    "perplexity": "ppl",
}
METRICS_OF: dict[str, tuple[str, ...]] = {
    "mc": ("acc", "acc_norm"),
    "winogrande": ("acc",),
    "lambada": ("acc", "ppl"),
    "gsm8k": ("exact_match",),
    "exact_match": ("exact_match",),
    "perplexity": ("ppl",),
}

Columns = Mapping[str, Sequence[float]]


def _ratio(metric: str, columns: Columns, index: np.ndarray | None) -> float:
    if metric == "ppl":
        nll, tokens = np.asarray(columns["nll"], dtype=float), np.asarray(columns["tokens"], dtype=float)
        if index is not None:
            nll, tokens = nll[index], tokens[index]
        return math.exp(nll.sum() / tokens.sum())
    values = np.asarray(columns[metric], dtype=float)
    return float(values.mean() if index is None else values[index].mean())


def _check(metric: str, columns: Columns) -> int:
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {list(METRICS)}, got {metric!r}")
    needed = ("nll", "tokens") if metric == "ppl" else (metric,)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"metric {metric!r} needs per-item columns {missing}")
    n = len(columns[needed[0]])
    if n == 0:
        raise ValueError(f"metric {metric!r} has no items")
    return n


def value(metric: str, columns: Columns) -> float:
    """The metric over all items.

    Example: `value("acc", {"acc": [1, 0, 1, 1]}) == 0.75`.
    """
    _check(metric, columns)
    return _ratio(metric, columns, None)


def bootstrap_ci(
    metric: str, columns: Columns, *, seed: int = 0, n_resamples: int = N_RESAMPLES
) -> tuple[float, float]:
    """95% percentile bootstrap interval of the metric, resampling items with a fixed seed.

    Example: `bootstrap_ci("acc", {"acc": [1, 0, 1, 1]}, seed=0)`.
    """
    n = _check(metric, columns)
    rng = np.random.default_rng(seed)
    draws = [_ratio(metric, columns, rng.integers(0, n, n)) for _ in range(n_resamples)]
    low, high = np.quantile(draws, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(low), float(high)


def summarise(metric: str, columns: Columns, *, seed: int = 0) -> dict[str, float]:
    """`{"value", "ci_low", "ci_high", "n"}` of one metric (the shape stored in results.json).

    Example: `summarise("acc", {"acc": [1, 0]})["n"] == 2`.
    """
    n = _check(metric, columns)
    low, high = bootstrap_ci(metric, columns, seed=seed)
    return {"value": value(metric, columns), "ci_low": low, "ci_high": high, "n": n}


def paired_difference(
    metric: str, a: Columns, b: Columns, *, seed: int = 0, n_resamples: int = N_RESAMPLES
) -> dict[str, float | bool]:
    """metric(a) - metric(b) with a paired bootstrap CI: both models resampled on the same item indices.

    Returns `{"diff", "ci_low", "ci_high", "n", "significant"}`; `significant` is False when the CI contains 0.

    Example: `paired_difference("acc", {"acc": [1, 1, 0]}, {"acc": [1, 0, 0]})["diff"]`.
    """
    n = _check(metric, a)
    if _check(metric, b) != n:
        raise ValueError(f"paired difference needs the same items, got {n} and {_check(metric, b)}")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        index = rng.integers(0, n, n)
        draws.append(_ratio(metric, a, index) - _ratio(metric, b, index))
    low, high = np.quantile(draws, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return {
        "diff": value(metric, a) - value(metric, b),
        "ci_low": float(low),
        "ci_high": float(high),
        "n": n,
        "significant": not (low <= 0.0 <= high),
    }


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def last_number(text: str) -> str | None:
    """The last number in a generation, normalised ('1,000' -> '1000'); None when there is none.

    Example: `last_number("so she makes $18.") == "18"`.
    """
    found = _NUMBER.findall(text)
    return normalise_number(found[-1]) if found else None
