"""`compare`: several results side by side, aligned by task and k, with paired bootstrap differences.

The reference is the first PHDS result (else the first given). For every other model, task and k evaluated on the
same items (same task digest), the difference of the primary metric to the reference gets a 95% paired bootstrap
CI; `n.s.` marks a CI that contains 0. Oracles (sidecar method "oracle", trained at one k) are recognised so the
report can show PHDS vs the oracle at its own k, and PHDS's agreement between k and k' next to the agreement
between oracle-k (at k) and oracle-k' (at k') on the same items.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phds.evaluation.agreement import agreement
from phds.evaluation.metrics import paired_difference
from phds.evaluation.report import _table, fmt, plot_frontier, read_results


def _label(results: dict[str, Any], taken: set[str]) -> str:
    base = str(results["model"]).rstrip("/").split("/")[-1] or str(results["model"])
    if results["method"] == "oracle":
        base = f"{base} (oracle k={results['sidecar']['ks'][0]})"
    elif results["method"] != "base":
        base = f"{base} ({results['method']})"
    label, n = base, 2
    while label in taken:
        label, n = f"{base} #{n}", n + 1
    taken.add(label)
    return label


def _oracle_k(results: dict[str, Any]) -> int | None:
    if results["method"] == "oracle" and results.get("sidecar"):
        return int(results["sidecar"]["ks"][0])
    return None


def _diff(task_a: dict, task_b: dict, k_a: str, k_b: str, seed: int) -> dict[str, Any] | None:
    if task_a["digest"] != task_b["digest"] or k_a not in task_a["items"] or k_b not in task_b["items"]:
        return None
    return paired_difference(task_a["primary"], task_a["items"][k_a], task_b["items"][k_b], seed=seed)


def _fmt_diff(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    mark = "" if d["significant"] else " n.s."
    return f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{mark}"


def compare(
    results: Sequence[str | os.PathLike | dict[str, Any]],
    out_dir: str | os.PathLike | None = None,
    *,
    labels: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare result files (or dicts) side by side; writes compare.json, compare.md and frontier.png.

    Args:
        results: results.json paths, directories holding one, or results dicts.
        out_dir: where to write the comparison (nothing is written when None).
        labels: display names (default: model name plus method / oracle k).
        seed: bootstrap seed.

    Returns:
        `{"models", "reference", "tasks": {task: [{"k", "values", "diffs"}]}, "oracle_vs_phds", "agreement"}`.

    Example: `phds.evaluation.compare(["out/phds", "out/oracle-k2", "out/base"], "out/compare")`.
    """
    if len(results) < 2:
        raise ValueError(f"`results` needs at least 2 results to compare, got {len(results)}")
    loaded = [r if isinstance(r, dict) else read_results(r) for r in results]
    if labels is not None and len(labels) != len(loaded):
        raise ValueError(f"`labels` must name each of the {len(loaded)} results, got {list(labels)}")
    taken: set[str] = set()
    names = list(labels) if labels is not None else [_label(r, taken) for r in loaded]
    ref = next((i for i, r in enumerate(loaded) if r["method"] == "phds"), 0)
    named = list(zip(names, loaded, strict=True))
    out = {
        "models": names,
        "reference": names[ref],
        "tasks": _metric_rows(named, loaded[ref], seed),
        "oracle_vs_phds": _oracle_rows(named, loaded[ref], seed),
        "agreement": _agreement_rows(loaded, loaded[ref]),
        "seed": seed,
    }
    if out_dir is not None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "compare.json").write_text(json.dumps(out, indent=1) + "\n")
        (path / "compare.md").write_text(markdown_compare(out, loaded))
        plot_frontier(loaded, path / "frontier.png", labels=names)
    return out


def _metric_rows(named: list[tuple[str, dict]], reference: dict, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Per task, one row per k any model was evaluated at: each model's primary metric and its paired difference to
    the reference (None where the two were not evaluated on the same items)."""
    table: dict[str, list[dict[str, Any]]] = {}
    for task_name in dict.fromkeys(t for _, r in named for t in r["tasks"]):
        evaluated = [r["tasks"][task_name] for _, r in named if task_name in r["tasks"]]
        # models are compared at ks; other operating points (policies, allocations) are reported by `evaluate`
        ks = sorted({int(k) for task in evaluated for k in task["metrics"] if k.isdigit()})
        ref_task = reference["tasks"].get(task_name)
        rows = []
        for key in map(str, ks):
            values, diffs = {}, {}
            for name, r in named:
                task = r["tasks"].get(task_name)
                values[name] = task["metrics"][key][task["primary"]] if task and key in task["metrics"] else None
                if r is not reference and task is not None and ref_task is not None:
                    diffs[name] = _diff(task, ref_task, key, key, seed)
            rows.append({"k": int(key), "values": values, "diffs": diffs})
        table[task_name] = rows
    return table


def _oracle_rows(named: list[tuple[str, dict]], reference: dict, seed: int) -> list[dict[str, Any]]:
    """The reference against each oracle at the oracle's own k, per task both were evaluated on at that k."""
    rows = []
    for name, r in named:
        k0 = _oracle_k(r)
        if k0 is None or r is reference:
            continue
        key = str(k0)
        for task_name, task in r["tasks"].items():
            ref_task = reference["tasks"].get(task_name)
            if ref_task is None or key not in ref_task["metrics"] or key not in task["metrics"]:
                continue
            rows.append(
                {
                    "task": task_name,
                    "k": k0,
                    "oracle": name,
                    "metric": task["primary"],
                    "phds": ref_task["metrics"][key][task["primary"]],
                    "oracle_value": task["metrics"][key][task["primary"]],
                    "diff": _diff(ref_task, task, key, key, seed),
                }
            )
    return rows


def _agreement_rows(loaded: Sequence[dict], reference: dict) -> list[dict[str, Any]]:
    """Per task and pair k < k': the reference's agreement between its answers at k and k', and, when oracles at
    both ks answered the same items, the agreement between oracle-k (at k) and oracle-k' (at k')."""
    oracles = {_oracle_k(r): r for r in loaded if _oracle_k(r) is not None}
    rows = []
    for task_name, ref_task in reference["tasks"].items():
        agree = ref_task["agreement"]
        ks = agree["ks"]
        for i, k in enumerate(ks):
            for j in range(i + 1, len(ks)):
                rows.append(
                    {
                        "task": task_name,
                        "k": k,
                        "k2": ks[j],
                        "phds": agree["matrix"][i][j],
                        "oracles": _oracle_agreement(oracles.get(k), oracles.get(ks[j]), task_name, k, ks[j]),
                    }
                )
    return rows


def _oracle_agreement(a: dict | None, b: dict | None, task_name: str, k: int, k2: int) -> float | None:
    """Agreement of oracle `a` at `k` with oracle `b` at `k2` on `task_name`; None unless both answered the same
    items there."""
    if a is None or b is None or task_name not in a["tasks"] or task_name not in b["tasks"]:
        return None
    ta, tb = a["tasks"][task_name], b["tasks"][task_name]
    if ta["digest"] != tb["digest"] or str(k) not in ta["items"] or str(k2) not in tb["items"]:
        return None
    return agreement(
        ta["items"][str(k)]["prediction"], tb["items"][str(k2)]["prediction"], positionwise=ta["kind"] == "perplexity"
    )


def markdown_compare(out: dict[str, Any], loaded: Sequence[dict[str, Any]]) -> str:
    """compare.md: a table per task (value [CI] per model, difference to the reference), oracle and agreement
    sections.

    Example: `print(markdown_compare(compare(paths), [read_results(p) for p in paths]))`.
    """
    names, ref = out["models"], out["reference"]
    others = [n for n in names if n != ref]
    lines = [
        f"# Comparison: {', '.join(names)}",
        "",
        f"reference: **{ref}**; values are `value [95% bootstrap CI]`; Δ is model − reference with a 95% "
        "paired bootstrap CI on the same items; **n.s.** = the CI contains 0 (not significant).",
        "",
    ]
    primaries = {t: r["tasks"][t]["primary"] for r in loaded for t in r["tasks"]}
    for task_name, rows in out["tasks"].items():
        metric = primaries[task_name]
        better = "higher" if metric != "ppl" else "lower"
        lines += [f"## {task_name} ({metric}, {better} is better)", ""]
        header = ["k"] + names + [f"Δ {n}" for n in others]
        body = [
            [row["k"]]
            + [fmt(row["values"][n], metric) for n in names]
            + [_fmt_diff(row["diffs"].get(n)) for n in others]
            for row in rows
        ]
        lines += _table(header, body) + [""]
    if out["oracle_vs_phds"]:
        lines += [f"## {ref} vs the oracle at its own k", ""]
        lines += _table(
            ["task", "k", "metric", ref, "oracle", f"Δ {ref} − oracle"],
            [
                [
                    r["task"],
                    r["k"],
                    r["metric"],
                    fmt(r["phds"], r["metric"]),
                    f"{r['oracle']}: {fmt(r['oracle_value'], r['metric'])}",
                    _fmt_diff(r["diff"]),
                ]
                for r in out["oracle_vs_phds"]
            ],
        ) + [""]
    if out["agreement"]:
        lines += [
            "## agreement between k and k'",
            "",
            f"{ref} at k vs at k', next to oracle-k (at k) vs oracle-k' (at k') on the same items.",
            "",
        ]
        lines += _table(
            ["task", "k", "k'", ref, "oracles"],
            [
                [
                    r["task"],
                    r["k"],
                    r["k2"],
                    f"{r['phds']:.3f}",
                    "-" if r["oracles"] is None else f"{r['oracles']:.3f}",
                ]
                for r in out["agreement"]
            ],
        ) + [""]
    return "\n".join(lines)
