"""Per-layer budgets: choose each MoE layer's k so that the mean k over layers meets a budget.

Greedy on calibration loss: every layer starts at `start` (default the model's k_pre); each step tries lowering
every layer by one, keeps the single cut whose calibration loss is lowest, and stops once the mean k over layers is
at most the budget. Layers whose experts matter least lose them first, so at equal mean k an allocation usually
beats one global k. The result is a `{layer_index: k}` dict, which `phds.set_k` takes as it is and which is saved as
a small JSON file (`save_allocation` / `load_allocation`) for `phds serve --allocation` and `phds eval`.

Calibration loss is the mean next-token NLL over the calibration rows' loss tokens (`phds.calibration_data`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from phds.calibration_data import calibration_batches, calibration_loss
from phds.dial import moe_layers, set_k, sparsity
from phds.training.data import DataSource

logger = logging.getLogger(__name__)

FORMAT = "phds-allocation"
VERSION = 1


@dataclass(kw_only=True)
class Allocation:
    """What `allocate` chose, and why.

    Attributes:
        ks: the k of every MoE layer, `{layer_index: k}` (a valid `k` for `phds.set_k`).
        budget: the mean k asked for.
        mean_k: the mean k over layers reached (at most `budget`).
        loss_start: calibration loss with every layer at `start`.
        loss_end: calibration loss at `ks`.
        trace: the greedy steps in order, `(layer_index, new_k, calibration_loss)`.
    """

    ks: dict[int, int]
    budget: float
    mean_k: float
    loss_start: float
    loss_end: float
    trace: list[tuple[int, int, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- calibration data


# ----------------------------------------------------------------------------- the greedy


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be an integer {allowed}, got {name}={value!r}")
    return value


def _resolve_model(model, tokenizer):
    if isinstance(model, (str, os.PathLike)):
        from phds.loading import load

        loaded, loaded_tokenizer = load(str(model))
        return loaded, tokenizer if tokenizer is not None else loaded_tokenizer
    return model, tokenizer


def allocate(
    model: nn.Module | str | os.PathLike,
    budget: float,
    data: DataSource,
    *,
    tokenizer=None,
    start: int | None = None,
    min_k: int = 1,
    max_length: int = 1024,
    batch_size: int = 8,
    progress: bool = True,
) -> Allocation:
    """Choose each MoE layer's k for a mean-k `budget`, greedily on calibration loss.

    Args:
        model: a loaded MoE model, or a checkpoint directory / hub name / `tiny:<family>` to load.
        budget: the mean k over MoE layers to reach (at most; a float like 2.5 is allowed).
        data: calibration rows, in any form `phds train` reads (`text`, `prompt`+`completion` or `messages`);
            never the evaluation items.
        tokenizer: the model's tokenizer (loaded with the model when `model` is a name).
        start: every layer's k before the first cut (default: the model's k_pre).
        min_k: no layer goes below this k.
        max_length: tokens per calibration row (longer rows keep their start).
        batch_size: rows per forward pass.
        progress: show a rich progress bar over the greedy steps.

    Returns:
        An `Allocation`; the model is left at the k it had.

    Raises:
        ValueError: a budget outside [min_k, start], empty data, a bad option; NotAnMoEError for a dense model.

    Example: `phds.allocation.allocate(model, 3, "calib.jsonl", tokenizer=tok).ks  # {0: 4, 1: 2, ...}`.
    """
    model, tokenizer = _resolve_model(model, tokenizer)
    layers = moe_layers(model)  # a dense model fails here, before any work
    if tokenizer is None:
        raise ValueError("`tokenizer` is required to read the calibration data; pass the model's tokenizer")
    num_experts = min(layer.num_experts for layer in layers)
    start = max(layer.k_pre for layer in layers) if start is None else start
    start = _check_int(start, "start", 1, num_experts)
    min_k = _check_int(min_k, "min_k", 1, start)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not min_k <= budget <= start:
        raise ValueError(
            f"`budget` must be a mean k in [min_k, start] = [{min_k}, {start}], got budget={budget!r}; "
            "lower `min_k` or raise `start` to widen the range"
        )
    _check_int(max_length, "max_length", 2)
    _check_int(batch_size, "batch_size", 1)
    device = next(model.parameters()).device
    batches = calibration_batches(tokenizer, data, max_length=max_length, batch_size=batch_size, device=device)

    ks = {layer.index: start for layer in layers}
    # Each step lowers the sum of ks by one: the steps needed to bring the mean to the budget.
    steps = max(0, math.ceil(len(ks) * start - len(ks) * budget - 1e-9))
    trace: list[tuple[int, int, float]] = []
    was_training = model.training
    model.eval()
    try:
        with (
            sparsity(model, ks),
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                disable=not progress,
            ) as bar,
        ):
            loss_start = loss = calibration_loss(model, batches)
            job = bar.add_task(f"allocate (loss {loss_start:.4f})", total=steps)
            for _ in range(steps):
                best: tuple[float, int] | None = None
                for index in sorted(ks):
                    if ks[index] <= min_k:
                        continue
                    set_k(model, {index: ks[index] - 1})
                    candidate = calibration_loss(model, batches)
                    set_k(model, {index: ks[index]})
                    if best is None or candidate < best[0]:  # ties go to the lower layer index
                        best = (candidate, index)
                assert best is not None, "the budget check leaves a layer above min_k at every step"
                loss, index = best
                ks[index] -= 1
                set_k(model, {index: ks[index]})
                trace.append((index, ks[index], loss))
                logger.info("allocate: layer %d -> k=%d, calibration loss %.4f", index, ks[index], loss)
                bar.update(job, advance=1, description=f"allocate: layer {index} -> k={ks[index]} (loss {loss:.4f})")
    finally:
        model.train(was_training)
    return Allocation(
        ks=ks, budget=budget, mean_k=sum(ks.values()) / len(ks), loss_start=loss_start, loss_end=loss, trace=trace
    )


# ----------------------------------------------------------------------------- the file


def check_allocation(ks: object, what: str = "allocation") -> dict[int, int]:
    """`ks` as a `{layer_index: k}` dict of ints, after checking its shape (the model checks the layers and ks).

    Example: `check_allocation({"0": 2, "1": 4}) == {0: 2, 1: 4}`.
    """
    if not isinstance(ks, dict) or not ks:
        raise ValueError(f'{what} must map layer indices to ks, like {{"0": 2, "1": 4}}, got {ks!r:.80}')
    out = {}
    for key, value in ks.items():
        index = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{what}: layer {key!r} is not a layer index (an integer >= 0)")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what}: layer {key}'s k must be an integer >= 1, got {value!r}")
        out[index] = value
    return dict(sorted(out.items()))


def save_allocation(allocation: Allocation, path: str | os.PathLike) -> Path:
    """Write `allocation` as JSON (its ks, budget, losses and greedy trace); returns the path.

    Example: `save_allocation(allocate(model, 3, "calib.jsonl", tokenizer=tok), "alloc.json")`.
    """
    path = Path(path)
    body = {"format": FORMAT, "version": VERSION, **asdict(allocation)}
    body["ks"] = {str(index): k for index, k in sorted(allocation.ks.items())}
    body["trace"] = [list(step) for step in allocation.trace]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return path


def load_allocation(path: str | os.PathLike) -> dict[int, int]:
    """The `{layer_index: k}` of an allocation file written by `save_allocation` (`phds allocate --out`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an allocation file (each message names the file and how to fix it).

    Example: `phds.set_k(model, load_allocation("alloc.json"))`.
    """
    path = Path(path)
    fix = "write it with `phds allocate MODEL --budget B --data calib.jsonl --out FILE`"
    if not path.is_file():
        raise FileNotFoundError(f"allocation file not found: {path}; {fix}")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"allocation file {path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f'{path} is not a phds allocation file (no "format": "{FORMAT}"); {fix}')
    if body.get("version") != VERSION:
        raise ValueError(
            f"allocation file {path} has version {body.get('version')!r}; this phds reads version {VERSION}: {fix}"
        )
    return check_allocation(body.get("ks"), what=f'allocation file {path}: "ks"')
