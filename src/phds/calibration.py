"""Calibrate a routing policy to a compute budget: find the threshold whose measured mean active experts hits it.

The mean routed experts per token under `TopP(tau)` grows with `tau` and under `Skip(beta)` shrinks with `beta`,
so a bisection on the threshold finds the budget. It is measured on calibration text the caller gives (a training
or validation split), never on evaluation items: a threshold calibrated on one domain can give a very different
mean k on another, which is why every evaluation reports the mean it measured, not the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.progress import Progress

from phds import dial
from phds.calibration_data import Batch, calibration_batches
from phds.policies import POLICIES, Policy, make_policy


@dataclass(frozen=True)
class Calibration:
    """A calibrated policy and what it measured on the calibration data.

    Attributes:
        policy: the policy at the chosen threshold.
        target: the mean active experts per token asked for.
        measured: the mean active experts per token the policy gave on the calibration data.
        trace: every (threshold, measured mean) the bisection tried, in order.
    """

    policy: Policy
    target: float
    measured: float
    trace: list[tuple[float, float]] = field(default_factory=list)


def measure_mean_active(model, policy, batches: list[Batch]) -> float:
    """Mean routed experts per real token and MoE layer under `policy`, over `batches` (the model is restored).

    Example: `measure_mean_active(model, TopP(0.7), calibration_batches(tok, rows, ...))`.
    """
    with torch.no_grad(), dial.sparsity(model, policy):
        for ids_BS, mask_BS, _ in batches:
            model(input_ids=ids_BS, attention_mask=mask_BS)
        return dial.mean_active_experts(model)


def calibrate(
    model,
    policy: str,
    *,
    target: float,
    data,
    tokenizer=None,
    k_max: int | None = None,
    tolerance: float = 0.01,
    max_steps: int = 30,
    max_length: int = 256,
    batch_size: int = 8,
    max_rows: int | None = None,
    progress: bool = True,
) -> Calibration:
    """Find the threshold at which `policy` ("top_p" or "skip") uses `target` routed experts per token on average.

    Args:
        model: a loaded MoE model (dialled back to its previous k afterwards).
        policy: "top_p" (threshold tau) or "skip" (threshold beta).
        target: the mean active routed experts per token wanted, in [1, k_max].
        data: calibration rows (`phds.calibration_data.calibration_batches`: a data file, rows or a list of
            texts); never the evaluation items.
        tokenizer: tokenises `data` (required for text).
        k_max: the most experts a token may use (default: the model's k_pre).
        tolerance: stop when the measured mean is within this of `target`.
        max_steps: bisection steps at most; the closest threshold seen is returned.
        max_length, batch_size, max_rows: how the calibration rows are cut, batched and how many are used.

    Returns:
        a `Calibration` with the policy, the target and the measured mean.

    Example: `phds.calibrate(model, "top_p", target=2.0, data=texts, tokenizer=tok).policy  # TopP(tau=0.43)`.
    """
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {sorted(POLICIES)}, got {policy!r}")
    ceiling = k_max if k_max is not None else dial.k_pre(model)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 1.0 <= target <= ceiling:
        raise ValueError(f"`target` must be a mean number of experts in [1, k_max={ceiling}], got {target!r}")
    if tokenizer is None:
        raise ValueError("`tokenizer` is required to calibrate on text")
    device = next(model.parameters()).device
    batches = calibration_batches(
        tokenizer, data, max_length=max_length, batch_size=batch_size, device=device, max_rows=max_rows
    )
    # the mean grows with top_p's tau and shrinks with skip's beta
    rising = policy == "top_p"
    low, high = 0.0, 1.0
    best: tuple[float, float] | None = None
    trace: list[tuple[float, float]] = []
    with Progress(disable=not progress) as bar:
        job = bar.add_task(f"calibrating {policy} to {target:g} experts", total=max_steps)
        for _ in range(max_steps):
            threshold = (low + high) / 2
            measured = measure_mean_active(model, make_policy(policy, threshold, k_max), batches)
            trace.append((threshold, measured))
            bar.advance(job)
            if best is None or abs(measured - target) < abs(best[1] - target):
                best = (threshold, measured)
            if abs(measured - target) <= tolerance:
                break
            if (measured < target) == rising:
                low = threshold
            else:
                high = threshold
    return Calibration(policy=make_policy(policy, best[0], k_max), target=float(target), measured=best[1], trace=trace)
