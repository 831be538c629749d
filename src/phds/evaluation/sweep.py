"""`sweep`: the robustness probe of a (base) model: evaluate at every k from 1 to k_pre and say where quality falls.

A k "holds" when no task's primary metric is meaningfully worse than at the reference k (k_pre, else the largest
k evaluated: `phds.sidecar.default_k`): worse means the 95% paired bootstrap CI of the difference, on the same
items, excludes 0 in the bad direction AND the drop exceeds `tolerance` (absolute for accuracies, relative for
perplexity; default 0.01), so a statistically clear but negligible change (perplexity 130.04 -> 130.05) does not
count as a fall-off.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phds import dial
from phds.evaluation.metrics import paired_difference
from phds.evaluation.report import dumps_results, markdown_report
from phds.evaluation.runner import evaluate, resolve_model
from phds.sidecar import default_k


def _worse(task: dict, k: str, ref: str, seed: int, tolerance: float) -> dict[str, Any]:
    metric = task["primary"]
    diff = paired_difference(metric, task["items"][k], task["items"][ref], seed=seed)
    drop = -diff["diff"] if task["higher_is_better"] else diff["diff"]
    if metric == "ppl":
        drop /= task["metrics"][ref][metric]["value"]
    return {**diff, "metric": metric, "worse": bool(diff["significant"] and drop > tolerance)}


def verdict(
    results: dict[str, Any], reference_k: int | None = None, tolerance: float = 0.01
) -> tuple[str, dict[str, Any]]:
    """A one-line verdict of where quality falls off, and the per-k paired differences behind it.

    Example: `line, detail = verdict(results)`.
    """
    ks = results["ks"]
    ref = reference_k if reference_k is not None else default_k(ks, results["k_pre"])
    if ref not in ks:
        raise ValueError(f"`reference_k` must be one of the evaluated ks {ks}, got {ref}")
    seed = results["settings"]["seed"]
    if tolerance < 0:
        raise ValueError(f"`tolerance` must be >= 0, got {tolerance}")
    detail: dict[str, Any] = {"reference_k": ref, "tolerance": tolerance, "ks": {}}
    holds_down_to = ref
    first_drop = None
    for k in sorted((k for k in ks if k < ref), reverse=True):
        diffs = {name: _worse(task, str(k), str(ref), seed, tolerance) for name, task in results["tasks"].items()}
        detail["ks"][str(k)] = diffs
        worse = [name for name, d in diffs.items() if d["worse"]]
        if worse and first_drop is None:
            first_drop = (k, worse)
        if first_drop is None:
            holds_down_to = k
    if first_drop is None:
        line = (
            f"quality holds at every k down to {holds_down_to}: no task is worse than at k={ref} by more "
            f"than {tolerance} with 95% paired-bootstrap significance"
        )
    else:
        k, worse = first_drop
        name = worse[0]
        task = results["tasks"][name]
        metric = task["primary"]
        before, after = task["metrics"][str(ref)][metric]["value"], task["metrics"][str(k)][metric]["value"]
        others = f" and {len(worse) - 1} more task(s)" if len(worse) > 1 else ""
        line = (
            f"quality holds down to k={holds_down_to} and falls off at k={k}: {name} {metric} {before:.3f} -> "
            f"{after:.3f} vs k={ref}{others} (95% paired bootstrap)"
        )
    return line, detail


def sweep(
    model,
    ks: Sequence[int] | None = None,
    tasks: Sequence[str | os.PathLike] | str = ("wikitext2_valid",),
    out_dir: str | os.PathLike | None = None,
    *,
    tokenizer=None,
    tolerance: float = 0.01,
    **evaluate_kwargs,
) -> dict[str, Any]:
    """Evaluate at every k from 1 to k_pre (or `ks`) and add a one-line `verdict` of where quality falls off.

    Args:
        model: as for `evaluate`.
        ks: the ks to probe (default 1..k_pre).
        tasks: task specs, as for `evaluate`.
        out_dir: when given, writes everything `evaluate` writes, with the verdict in results.json and report.md.
        tolerance: smallest drop that counts as a fall-off (absolute for accuracies, relative for perplexity).
        **evaluate_kwargs: forwarded to `evaluate` (limit, batch_size, num_fewshot, ...).

    Example: `phds.evaluation.sweep("tiny:olmoe", tasks=["copa"], limit=50)["verdict"]`.
    """
    if tolerance < 0:
        raise ValueError(f"`tolerance` must be >= 0, got {tolerance}")
    loaded, tokenizer, name = resolve_model(model, tokenizer, evaluate_kwargs.pop("device", None))
    if tokenizer is None:
        raise ValueError("`tokenizer` is required: the model came without one")
    if ks is None:
        ks = list(range(1, dial.k_pre(loaded) + 1))
    evaluate_kwargs.setdefault("model_name", name)
    results = evaluate((loaded, tokenizer), ks, tasks, out_dir=out_dir, **evaluate_kwargs)
    line, detail = verdict(results, tolerance=tolerance)
    results["verdict"] = line
    results["sweep"] = detail
    if out_dir is not None:
        out = Path(out_dir)
        (out / "results.json").write_text(dumps_results(results))
        (out / "report.md").write_text(f"**verdict:** {line}\n\n" + markdown_report(results))
    return results
