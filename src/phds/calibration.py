"""Calibrate a routing policy to a compute budget: find the threshold whose measured mean active experts hits it.

The mean routed experts per token under `TopP(tau)` grows with `tau` and under `Skip(beta)` shrinks with `beta`,
so a bisection on the threshold finds the budget. It is measured on calibration text the caller gives (a training
or validation split), never on evaluation items: a threshold calibrated on one domain can give a very different
mean k on another, which is why every evaluation reports the mean it measured, not the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from rich.progress import Progress

from phds import dial
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


def calibration_texts(data, tokenizer) -> list[str]:
    """The texts of a calibration source: a list of strings, or rows as training reads them (a .jsonl/.txt path,
    a `datasets` Dataset or a list of dicts with `text`, `prompt`+`completion` or chat `messages`).

    Example: `calibration_texts(["The cat sat.", "2+2=4"], tokenizer)`.
    """
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and all(isinstance(t, str) for t in data):
        texts = list(data)
    else:
        from phds.training.data import read_rows, select_columns

        rows = select_columns(read_rows(data, what="data"), what="data")
        texts = [_row_text(row, tokenizer) for row in rows]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError("`data` has no text to calibrate on; give a non-empty list of strings or a data file")
    return texts


def _row_text(row: dict, tokenizer) -> str:
    if "messages" in row:
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if "prompt" in row:
        return row["prompt"] + row["completion"]
    return row["text"]


def token_batches(tokenizer, texts: list[str], *, max_length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded `input_ids` / `attention_mask` batches of the texts, each cut to `max_length` tokens.

    Example: `token_batches(tokenizer, texts, max_length=256, batch_size=8)[0]["input_ids"].shape`.
    """
    encoded = [tokenizer(text, add_special_tokens=True).input_ids[:max_length] for text in texts]
    encoded = [ids for ids in encoded if ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def measure_mean_active(model, policy, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean routed experts per real token and MoE layer under `policy`, over `batches` (the model is restored).

    Example: `measure_mean_active(model, TopP(0.7), batches)`.
    """
    device = next(model.parameters()).device
    with torch.no_grad(), dial.sparsity(model, policy):
        for batch in batches:
            model(**{name: tensor.to(device) for name, tensor in batch.items()})
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
    progress: bool = True,
) -> Calibration:
    """Find the threshold at which `policy` ("top_p" or "skip") uses `target` routed experts per token on average.

    Args:
        model: a loaded MoE model (dialled back to its previous k afterwards).
        policy: "top_p" (threshold tau) or "skip" (threshold beta).
        target: the mean active routed experts per token wanted, in [1, k_max].
        data: calibration text (see `calibration_texts`); never the evaluation items.
        tokenizer: tokenises `data` (required for text).
        k_max: the most experts a token may use (default: the model's k_pre).
        tolerance: stop when the measured mean is within this of `target`.
        max_steps: bisection steps at most; the closest threshold seen is returned.
        max_length, batch_size: how the calibration text is cut and batched.

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
    batches = token_batches(
        tokenizer, calibration_texts(data, tokenizer), max_length=max_length, batch_size=batch_size
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
