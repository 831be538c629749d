"""PHDSSchedule: which k (experts per token) each optimizer step trains at.

One global k per optimizer step (`sampling="global"`, the paper), drawn from the declared set `ks` with `weights`;
in the last `anchor_fraction` of the steps a curriculum ramps the probability of `anchor_k` linearly from its
mixture weight to 1. A fixed-k oracle is the same schedule with `ks=[k]`. With `sampling="layer"` (Matryoshka-MoE,
arXiv 2509.26520) every MoE layer draws its own k per step from the same distribution, so the last step puts every
layer at the anchor.

`k_at(step, total_steps)` and `ks_at(step, total_steps, layers)` are pure functions of their arguments (and the
schedule's fields): every process of a distributed run, and a run resumed from a checkpoint, computes the same k for
the same step without communicating. No torch here: the global draw uses numpy's SeedSequence keyed by
`(seed, step)`; layer `i`'s draw uses the child of that sequence with spawn key `(i,)`, which numpy makes
independent of the parent's stream and of every other child's.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from phds.sidecar import check_ks

SAMPLING = ("global", "layer")


def default_ks(k_pre: int) -> list[int]:
    """Every integer from ceil(k_pre / 2) to k_pre: the declared set when none is given.

    Example: `default_ks(8) == [4, 5, 6, 7, 8]`.
    """
    if isinstance(k_pre, bool) or not isinstance(k_pre, numbers.Integral) or k_pre < 1:
        raise ValueError(f"`k_pre` must be a positive int, got {k_pre!r}")
    return list(range(math.ceil(k_pre / 2), int(k_pre) + 1))


@dataclass(kw_only=True)
class PHDSSchedule:
    """The per-step k of a PHDS (or fixed-k oracle) fine-tune.

    Attributes:
        ks: the declared k set (sorted, unique); None means `default_ks(k_pre)`.
        k_pre: the model's pretrained k; only needed when `ks` is None.
        weights: sampling weight of each k in `ks` (same order, normalised); None means uniform.
        anchor_k: the k the curriculum converges to; None means `min(ks)`.
        anchor_fraction: share of the last steps in the anchor phase; 0 turns the curriculum off.
        seed: the draw of step `s` depends only on `(seed, s)` (and the layer's index for `sampling="layer"`).
        sampling: "global" draws one k per step for the whole model (`k_at`); "layer" draws one per MoE layer
            (`ks_at`). `dialled_at` returns what a step dials in either case.

    Example: `PHDSSchedule(ks=[2, 3, 4], seed=0).k_at(10, 100)`.
    """

    ks: list[int] | None = None
    k_pre: int | None = None
    weights: list[float] | None = None
    anchor_k: int | None = None
    anchor_fraction: float = 0.06
    seed: int = 0
    sampling: str = "global"

    def __post_init__(self) -> None:
        if self.ks is None:
            if self.k_pre is None:
                raise ValueError("`ks` is None and no `k_pre` was given to derive the default ks from")
            self.ks = default_ks(self.k_pre)
        ks = list(self.ks)
        check_ks(ks)
        order = sorted(range(len(ks)), key=lambda i: ks[i])
        self.ks = [int(ks[i]) for i in order]
        if self.weights is not None:
            weights = list(self.weights)
            if len(weights) != len(ks):
                raise ValueError(f"`weights` must have one entry per k in ks={self.ks}, got weights={self.weights!r}")
            if any(not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0 for w in weights) or not sum(
                weights
            ):
                raise ValueError(f"`weights` must be finite, non-negative and not all zero, got {self.weights!r}")
            total = float(sum(weights))
            self.weights = [float(weights[i]) / total for i in order]
        if self.anchor_k is None:
            self.anchor_k = self.ks[0]
        if self.anchor_k not in self.ks:
            raise ValueError(f"`anchor_k` must be one of the declared ks {self.ks}, got anchor_k={self.anchor_k!r}")
        if not isinstance(self.anchor_fraction, numbers.Real) or not 0.0 <= self.anchor_fraction <= 1.0:
            raise ValueError(f"`anchor_fraction` must be in [0, 1], got {self.anchor_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {self.seed!r}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"`sampling` must be one of {list(SAMPLING)}, got sampling={self.sampling!r}")

    @classmethod
    def fixed(cls, k: int, *, seed: int = 0) -> PHDSSchedule:
        """The schedule of a fixed-k oracle: always `k`.

        Example: `PHDSSchedule.fixed(4).k_at(0, 10) == 4`.
        """
        return cls(ks=[k], anchor_fraction=0.0, seed=seed)

    @property
    def is_fixed(self) -> bool:
        return len(self.ks) == 1

    def mixture(self) -> list[float]:
        """The sampling probability of each k in `ks` outside the anchor phase."""
        return list(self.weights) if self.weights is not None else [1.0 / len(self.ks)] * len(self.ks)

    def anchor_steps(self, total_steps: int) -> int:
        """How many of the last steps are in the anchor phase."""
        return int(round(self.anchor_fraction * total_steps))

    def probabilities(self, step: int, total_steps: int) -> list[float]:
        """The sampling distribution over `ks` at `step` (0-based) of `total_steps`.

        In the anchor phase the anchor's probability ramps linearly from its mixture weight (first anchor step,
        exclusive) to 1 (last step); the other ks keep their relative weights.

        Example: `PHDSSchedule(ks=[2, 4]).probabilities(99, 100) == [1.0, 0.0]`.
        """
        _check_step(step, total_steps)
        probs = self.mixture()
        n_anchor = self.anchor_steps(total_steps)
        start = total_steps - n_anchor
        if n_anchor == 0 or step < start or self.is_fixed:
            return probs
        ramp = (step - start + 1) / n_anchor  # in (0, 1], 1 on the last step
        a = self.ks.index(self.anchor_k)
        p_anchor = probs[a] + (1.0 - probs[a]) * ramp
        rest = 1.0 - probs[a]
        scale = (1.0 - p_anchor) / rest if rest > 0 else 0.0
        return [p_anchor if i == a else p * scale for i, p in enumerate(probs)]

    def k_at(self, step: int, total_steps: int) -> int:
        """The global k of optimizer step `step` (0-based) of a run of `total_steps` steps; a pure function.

        Example: `PHDSSchedule(ks=[2, 3, 4], seed=1).k_at(0, 100)`.
        """
        probs = self.probabilities(step, total_steps)
        if self.is_fixed:
            return self.ks[0]
        return self._pick(np.random.default_rng([int(self.seed), int(step)]).random(), probs)

    def ks_at(self, step: int, total_steps: int, layers: Iterable[int]) -> dict[int, int]:
        """The k of every MoE layer (by index) at optimizer step `step` of `total_steps`: one independent draw per
        layer from `probabilities(step, total_steps)`; a pure function of `(seed, step, layer)`.

        Example: `PHDSSchedule(ks=[2, 3, 4], seed=1).ks_at(0, 100, [0, 1]) == {0: 4, 1: 3}`.
        """
        layers = list(layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in layers):
            raise ValueError(f"`layers` must be a non-empty list of MoE layer indices (ints >= 0), got {layers!r}")
        probs = self.probabilities(step, total_steps)
        if self.is_fixed:
            return {int(i): self.ks[0] for i in layers}
        return {int(i): self._pick(self._layer_rng(step, int(i)).random(), probs) for i in layers}

    def dialled_at(self, step: int, total_steps: int, layers: Iterable[int]) -> int | dict[int, int]:
        """What step `step` dials: `k_at` for `sampling="global"`, `ks_at` for `"layer"` (a `phds.set_k` k).

        Example: `PHDSSchedule(ks=[2, 4], sampling="layer").dialled_at(1, 10, [0, 1]) == {0: 4, 1: 2}`.
        """
        if self.sampling == "layer":
            return self.ks_at(step, total_steps, layers)
        return self.k_at(step, total_steps)

    def _layer_rng(self, step: int, layer: int) -> np.random.Generator:
        # The child of the global draw's SeedSequence that `SeedSequence.spawn` would make for spawn key (layer,).
        return np.random.default_rng(np.random.SeedSequence([int(self.seed), int(step)], spawn_key=(layer,)))

    def _pick(self, u: float, probs: list[float]) -> int:
        """The k whose cumulative-probability interval holds `u` (inverse CDF)."""
        cumulative = 0.0
        for k, p in zip(self.ks, probs, strict=True):
            cumulative += p
            if u < cumulative:
                return k
        return next(
            k for k, p in zip(reversed(self.ks), reversed(probs), strict=True) if p > 0
        )  # u landed in round-off

    def sequence(self, total_steps: int) -> list[int]:
        """The global k of every step of a run: `[k_at(s, total_steps) for s in range(total_steps)]`.

        Example: `PHDSSchedule.fixed(2).sequence(3) == [2, 2, 2]`.
        """
        return [self.k_at(step, total_steps) for step in range(total_steps)]

    def mean_k(self) -> float:
        """The expected k outside the anchor phase (what a fixed-k oracle matches for cost comparisons)."""
        return float(sum(k * p for k, p in zip(self.ks, self.mixture(), strict=True)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PHDSSchedule:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PHDSSchedule fields {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**data)


def _check_step(step: int, total_steps: int) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise ValueError(f"`total_steps` must be a positive int, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < total_steps:
        raise ValueError(f"`step` must be an int in [0, total_steps={total_steps}), got {step!r}")
