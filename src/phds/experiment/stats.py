"""Run-level statistics: the training run, not the item, is the unit of analysis.

A comparison of two arms at one k on one task is the per-seed paired difference `d_s = score(ref, s) - score(other,
s)`, oriented so that a positive `d` means the reference is better (perplexity: the difference of log perplexities,
i.e. of mean NLL per token, other minus reference). Its confidence interval is either

- `t`: the t interval of the mean of `d_s` over seeds (n - 1 degrees of freedom; undefined for one seed), or
- `bootstrap`: hierarchical — resample seeds with replacement, then items with replacement within each drawn seed
  (the same items for both arms), and take percentiles of the mean difference.

Both put the seed-to-seed variance of training into the interval, which an item-level bootstrap leaves out.

Verdicts against the margin δ declared before the run (`ci` = [low, high]):
- **better**: low > 0;
- **non-inferior**: low > −δ (the reference is at worst δ behind; it may still be significantly behind by less);
- **worse**: high < −δ (behind by more than the margin);
- **inconclusive**: anything else — the interval is too wide to tell, which is never reported as "no difference".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

VERDICTS = ("better", "non-inferior", "worse", "inconclusive")
N_RESAMPLES = 2000


@dataclass
class Ratio:
    """Per-item numerator and denominator of a score: score = sum(num) / sum(den).

    A share (accuracy, exact match) has `den` = 1 per item; perplexity has `num` = NLL and `den` = tokens, so the
    score is the mean NLL per token, log perplexity.
    """

    num: np.ndarray
    den: np.ndarray

    @classmethod
    def of(cls, metric: str, columns: dict[str, Sequence[float]]) -> Ratio:
        if metric == "ppl":
            return cls(np.asarray(columns["nll"], dtype=float), np.asarray(columns["tokens"], dtype=float))
        values = np.asarray(columns[metric], dtype=float)
        return cls(values, np.ones_like(values))

    def value(self) -> float:
        return float(self.num.sum() / self.den.sum())


def display_value(metric: str, score: float) -> float:
    """A score as users read it: perplexity for `ppl` (scores are log perplexity), the share otherwise."""
    return math.exp(score) if metric == "ppl" else score


@dataclass
class Difference:
    """A run-level difference (reference minus other, oriented so that positive favours the reference)."""

    mean: float
    low: float | None
    high: float | None
    per_seed: list[float]
    seeds: list[int]
    method: str
    verdict: str
    margin: float

    def to_dict(self) -> dict:
        return asdict(self)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and t interval of `values` (None bounds for fewer than two values: the spread is unknown).

    Example: `t_interval([0.1, 0.2, 0.3])` -> (0.2, -0.048..., 0.448...).
    """
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None, None
    half = float(
        scipy_stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    )
    return mean, mean - half, mean + half


def hierarchical_bootstrap(
    reference: Sequence[Ratio],
    other: Sequence[Ratio],
    *,
    sign: float = 1.0,
    confidence: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the mean over seeds of `sign * (score(reference) - score(other))`, resampling seeds,
    then the same items for both arms within each drawn seed.

    Example: `hierarchical_bootstrap([Ratio(a0, ones), Ratio(a1, ones)], [Ratio(b0, ones), Ratio(b1, ones)])`.
    """
    if len(reference) != len(other) or not reference:
        raise ValueError(f"need the same non-zero number of runs per arm, got {len(reference)} and {len(other)}")
    n_items = {len(r.num) for r in (*reference, *other)}
    if len(n_items) != 1:
        raise ValueError(f"every run must be scored on the same items, got item counts {sorted(n_items)}")
    (n,) = n_items
    rng = np.random.default_rng(seed)
    stack = lambda runs, part: np.stack([getattr(r, part) for r in runs])  # noqa: E731  (S, N)
    ref_num, ref_den, oth_num, oth_den = (
        stack(reference, "num"),
        stack(reference, "den"),
        stack(other, "num"),
        stack(other, "den"),
    )
    n_seeds = len(reference)
    seeds_RS = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    items_RSN = rng.integers(0, n, size=(n_resamples, n_seeds, n))
    pick = lambda table: table[seeds_RS[..., None], items_RSN].sum(-1)  # noqa: E731  (R, S)
    diff_RS = pick(ref_num) / pick(ref_den) - pick(oth_num) / pick(oth_den)
    means_R = sign * diff_RS.mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means_R, tail)), float(np.quantile(means_R, 1 - tail))


def verdict(low: float | None, high: float | None, margin: float) -> str:
    """The verdict of an interval against the non-inferiority margin (see the module docstring).

    Example: `verdict(-0.01, 0.03, margin=0.02) == "non-inferior"`.
    """
    if low is None or high is None:
        return "inconclusive"
    if low > 0:
        return "better"
    if low > -margin:
        return "non-inferior"
    if high < -margin:
        return "worse"
    return "inconclusive"


def compare_runs(
    reference: dict[int, Ratio],
    other: dict[int, Ratio],
    *,
    higher_is_better: bool,
    margin: float,
    method: str = "t",
    confidence: float = 0.95,
    seed: int = 0,
) -> Difference:
    """The run-level difference of two arms at one k on one task, with its interval and verdict.

    `reference` and `other` map an SFT seed to that run's per-item scores; runs are paired by seed (an untrained
    arm, like the base model, maps every seed to its one run).

    Example: `compare_runs({0: Ratio(a0, ones), 1: Ratio(a1, ones)}, {0: ..., 1: ...},
    higher_is_better=True, margin=0.02)`.
    """
    seeds = sorted(set(reference) & set(other))
    if not seeds:
        raise ValueError(f"no seed has runs of both arms (reference {sorted(reference)}, other {sorted(other)})")
    sign = 1.0 if higher_is_better else -1.0
    per_seed = [sign * (reference[s].value() - other[s].value()) for s in seeds]
    if method == "t":
        mean, low, high = t_interval(per_seed, confidence)
    elif method == "bootstrap":
        mean = float(np.mean(per_seed))
        low, high = hierarchical_bootstrap(
            [reference[s] for s in seeds], [other[s] for s in seeds], sign=sign, confidence=confidence, seed=seed
        )
    else:
        raise ValueError(f"`method` must be 't' or 'bootstrap', got {method!r}")
    return Difference(mean, low, high, per_seed, seeds, method, verdict(low, high, margin), margin)
