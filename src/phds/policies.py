"""Training-free routing policies: a per-token k chosen from the router's own scores, applied by the dial.

Shape suffixes: T tokens, K routed slots (the router's top-`k_max`, in the router's rank order: slot 0 is its best).

- `TopP(tau)` (Huang et al. 2024, "Harder tasks need more experts"): keep the smallest prefix of the ranked experts
  whose cumulative probability reaches `tau`; the expert that crosses `tau` is kept. Probabilities are the softmax
  of the router logits over all experts (for sigmoid routers too), so `tau` means the same on every family.
- `Skip(beta)` (Lu et al. 2024, "Not all experts are equal"): keep the top expert, then each next one while its gate
  weight is at least `beta` times the top expert's.

Both keep between 1 and `k_max` experts (default: the layer's pretrained k). The kept experts get the weights the
router gives them; routers that renormalise their top-k weights renormalise over the kept ones, as at a fixed k.

Example: `phds.set_k(model, phds.TopP(0.7))`, then `phds.active_experts(model)` after a forward.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TopP:
    """Keep experts until their cumulative router probability reaches `tau` (in (0, 1]), at most `k_max`."""

    tau: float
    k_max: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real) or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"`tau` of TopP must be a number in (0, 1], got {self.tau!r}")
        _check_k_max(self.k_max)

    name = "top_p"

    @property
    def threshold(self) -> float:
        return float(self.tau)

    def counts(self, probs_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Experts kept per token, from ranked probabilities `probs_TK` (weights unused)."""
        cumulative_TK = probs_TK.float().cumsum(dim=-1)
        # slots before the crossing one have a cumulative sum below tau; the crossing slot itself is kept
        below_T = (cumulative_TK[:, :-1] < self.tau).sum(dim=-1)
        return (below_T + 1).clamp(1, probs_TK.shape[-1])

    def __str__(self) -> str:
        return _label(self)


@dataclass(frozen=True)
class Skip:
    """Keep the top expert and each next one while its weight is >= `beta` x the top weight, at most `k_max`."""

    beta: float
    k_max: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"`beta` of Skip must be a number in [0, 1], got {self.beta!r}")
        _check_k_max(self.k_max)

    name = "skip"

    @property
    def threshold(self) -> float:
        return float(self.beta)

    def counts(self, probs_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Experts kept per token, from ranked gate weights `weights_TK` (probabilities unused)."""
        weights_TK = weights_TK.float()
        passes_TK = weights_TK[:, 1:] >= self.beta * weights_TK[:, :1]
        # "while": the run of passing slots right after the top one
        run_T = passes_TK.to(torch.int64).cumprod(dim=-1).sum(dim=-1)
        return run_T + 1

    def __str__(self) -> str:
        return _label(self)


Policy = TopP | Skip
POLICIES = {"top_p": TopP, "skip": Skip}


def _check_k_max(k_max) -> None:
    if k_max is not None and (isinstance(k_max, bool) or not isinstance(k_max, numbers.Integral) or k_max < 1):
        raise ValueError(f"`k_max` of a routing policy must be a positive int or None, got {k_max!r}")


def _label(policy: Policy) -> str:
    text = f"{policy.name}={policy.threshold:g}"
    return text if policy.k_max is None else f"{text},k_max={policy.k_max}"


def make_policy(name: str, threshold: float, k_max: int | None = None) -> Policy:
    """The policy called `name` ("top_p" or "skip") at `threshold` (tau or beta).

    Example: `make_policy("top_p", 0.7) == TopP(0.7)`.
    """
    if name not in POLICIES:
        raise ValueError(f"routing policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name](threshold, k_max)


_SPEC = re.compile(r"^\s*(top_p|skip)\s*=\s*([0-9.eE+-]+)\s*(?:,\s*k_max\s*=\s*(\d+)\s*)?$")


def parse_policy(text: str) -> Policy:
    """A policy from its label: `top_p=0.7`, `skip=0.3`, optionally `,k_max=6` (what `str(policy)` writes).

    Example: `parse_policy("top_p=0.7,k_max=4") == TopP(0.7, 4)`.
    """
    match = _SPEC.match(text)
    if not match:
        raise ValueError(
            f"a routing policy is written 'top_p=TAU' or 'skip=BETA' (optionally ',k_max=N'), got {text!r}"
        )
    name, value, k_max = match.groups()
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"the threshold of {text!r} is not a number") from None
    return make_policy(name, threshold, int(k_max) if k_max else None)
