"""Write an evaluation's outputs: results.json, predictions.jsonl, report.md, frontier.png, agreement.png."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.jsonl"


def fmt(summary: dict[str, float] | None, metric: str = "") -> str:
    """'0.625 [0.50, 0.75]' for a metric summary; '-' for None.

    Example: `fmt({"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10})`.
    """
    if summary is None:
        return "-"
    digits = 2 if metric == "ppl" else 3
    return f"{summary['value']:.{digits}f} [{summary['ci_low']:.{digits}f}, {summary['ci_high']:.{digits}f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def markdown_report(results: dict[str, Any]) -> str:
    """The report.md of one evaluation: settings, a metrics table and an agreement matrix per task, latency.

    Example: `print(markdown_report(results))`.
    """
    s = results["settings"]
    lines = [
        f"# Evaluation of `{results['model']}` across k",
        "",
        f"method: **{results['method']}**, k_pre {results['k_pre']}, {results['num_experts']} experts per layer, "
        f"ks evaluated {results['ks']}"
        + (f", declared ks {results['sidecar']['ks']}" if results.get("sidecar") else ""),
        "",
        f"settings: limit {s['limit']}, {s['num_fewshot']}-shot, batch size {s['batch_size']}, max new tokens "
        f"{s['max_new_tokens']}, max length {s['max_length']}, seed {s['seed']}; "
        f"values are `value [95% bootstrap CI]`. Device {results['device']}, created {results['created']}.",
        "",
    ]
    for name, task in results["tasks"].items():
        metrics = list(next(iter(task["metrics"].values())))
        lines += [
            f"## {name} ({task['kind']}, n={task['n']}, primary: {task['primary']}"
            + (" lower is better" if not task["higher_is_better"] else "")
            + ")",
            "",
        ]
        compute = task.get("compute", {})
        generation = any("tokens_per_answer" in c for c in compute.values())
        rows = []
        for k in task["metrics"]:
            used = compute.get(k, {})
            row = [
                k,
                _count(used.get("active_params", results["active_params"][k])),
                _count(used.get("active_experts"), 2),
            ]
            if generation:
                row += [_count(used.get("tokens_per_answer"), 1), _count(used.get("seconds_per_answer"), 3)]
            rows.append(row + [fmt(task["metrics"][k][m], m) for m in metrics])
        header = ["k", "active params", "experts/token"] + (["tokens/answer", "s/answer"] if generation else [])
        lines += _table(header + metrics, rows) + [""]
        agreement = task["agreement"]
        what = (
            "share of positions whose top-1 next token agrees"
            if task["kind"] == "perplexity"
            else "share of items with the same prediction"
        )
        lines += [f"agreement ({what}):", ""]
        lines += _table(
            ["k \\ k'"] + [str(k) for k in agreement["ks"]],
            [[k] + [f"{v:.3f}" for v in row] for k, row in zip(agreement["ks"], agreement["matrix"], strict=True)],
        ) + [""]
    if results["latency"]:
        first = next(iter(results["latency"].values()))
        lines += [
            f"## latency ({results['device']}, prompt {first['prompt_tokens']} tokens, "
            f"{first['new_tokens']} new tokens, batch {first['batch_size']}, HF generate)",
            "",
        ]
        lines += _table(
            ["k", "active params", "prefill tokens/s", "decode ms/token"],
            [
                [k, f"{v['active_params']:,}", f"{v['prefill_tokens_per_s']:.1f}", f"{v['decode_ms_per_token']:.2f}"]
                for k, v in results["latency"].items()
            ],
        ) + [""]
    lines += ["versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(lines)


def _count(value, digits: int = 0) -> str:
    """A measured quantity for a table: thousands separators for parameter counts, n/a when not measured."""
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(
    results_list: Sequence[dict[str, Any]], path: str | os.PathLike, labels: Sequence[str] | None = None
):
    """Primary metric vs active parameters (left) and vs decode ms/token (right), one row per task, one line per
    model, each point labelled with its k and drawn with its 95% CI.

    Example: `plot_frontier([results_phds, results_base], "frontier.png")`.
    """
    plt = _pyplot()
    from matplotlib.transforms import ScaledTranslation

    labels = list(labels) if labels is not None else [r["model"] for r in results_list]
    task_names = list(dict.fromkeys(t for r in results_list for t in r["tasks"]))
    has_latency = any(r["latency"] for r in results_list)
    cols = 2 if has_latency else 1
    fig, axes = plt.subplots(len(task_names), cols, figsize=(5.5 * cols, 3.6 * len(task_names)), squeeze=False)
    for row, task_name in enumerate(task_names):
        for col in range(cols):
            ax = axes[row][col]
            for index, (results, label) in enumerate(zip(results_list, labels, strict=True)):
                # models sharing an x (an oracle at the base's k) are dodged sideways by a few points
                dodge = ScaledTranslation(5 * (index - (len(results_list) - 1) / 2) / 72, 0, fig.dpi_scale_trans)
                task = results["tasks"].get(task_name)
                if task is None:
                    continue
                ks = list(task["metrics"])
                if col == 0:
                    # what each point used on this task (a policy's differs by task), else the per-k count
                    used = task.get("compute", {})
                    xs = [used.get(k, {}).get("active_params", results["active_params"][k]) / 1e6 for k in ks]
                else:
                    if not results["latency"]:
                        continue
                    xs = [results["latency"][k]["decode_ms_per_token"] for k in ks]
                summaries = [task["metrics"][k][task["primary"]] for k in ks]
                ys = [s["value"] for s in summaries]
                err = [
                    [y - s["ci_low"] for y, s in zip(ys, summaries, strict=True)],
                    [s["ci_high"] - y for y, s in zip(ys, summaries, strict=True)],
                ]
                line = ax.errorbar(
                    xs, ys, yerr=err, marker="o", capsize=3, label=label, transform=ax.transData + dodge
                )
                # a non-data transform does not update the data limits: add the points and CI ends by hand
                ax.update_datalim(
                    [(x, s[bound]) for x, s in zip(xs, summaries, strict=True) for bound in ("ci_low", "ci_high")]
                )
                for x, y, k in zip(xs, ys, ks, strict=True):
                    ax.annotate(
                        f"k={k}",
                        (x, y),
                        textcoords="offset points",
                        xytext=(4 + 5 * (index - (len(results_list) - 1) / 2), 4),
                        fontsize=8,
                        color=line[0].get_color(),
                    )
            ax.autoscale_view()
            task_info = next(r for r in results_list if task_name in r["tasks"])["tasks"][task_name]
            better = "higher" if task_info["higher_is_better"] else "lower"
            ax.set_title(task_name, fontsize=10)
            if task_info["primary"] == "ppl":
                ax.set_yscale("log")  # models before and after fine-tuning differ by orders of magnitude
            ax.set_ylabel(f"{task_info['primary']} ({better} is better)")
            ax.set_xlabel("active parameters per token (M)" if col == 0 else "decode ms/token (measured)")
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    height = fig.get_figheight()  # inches: title, then the legend, then the panels
    fig.suptitle("quality vs cost across k (error bars: 95% bootstrap CI)", y=1.0 - 0.08 / height, va="top")
    fig.legend(
        handles,
        names,
        loc="upper center",
        ncol=min(4, len(names)),
        fontsize=9,
        bbox_to_anchor=(0.5, 1.0 - 0.4 / height),
    )
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.8 / height))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_agreement(results: dict[str, Any], path: str | os.PathLike):
    """One heatmap per task of the cross-k agreement matrix, values written in the cells.

    Example: `plot_agreement(results, "agreement.png")`.
    """
    plt = _pyplot()
    names = list(results["tasks"])
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        agreement = results["tasks"][name]["agreement"]
        ks, matrix = agreement["ks"], agreement["matrix"]
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("k'")
        if ax in axes[:, 0]:
            ax.set_ylabel("k")
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
        ax.set_title(f"{name}", fontsize=10)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="agreement")
    fig.suptitle(f"{results['model']}: agreement between k and k'", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def dumps_results(results: dict[str, Any]) -> str:
    """results.json text: indented, except the long per-item columns, which stay one line per k.

    Example: `Path("results.json").write_text(dumps_results(results))`.
    """
    shallow = {**results, "tasks": {}}
    compact = {}
    for name, task in results["tasks"].items():
        marker = f"@@items:{name}@@"
        compact[marker] = (
            "{"
            + ", ".join(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in task["items"].items())
            + "}"
        )
        shallow["tasks"][name] = {**task, "items": marker}
    text = json.dumps(shallow, indent=1)
    for marker, value in compact.items():
        text = text.replace(json.dumps(marker), value)
    return text + "\n"


def write_outputs(results: dict[str, Any], records: Sequence[dict], out_dir: str | os.PathLike) -> Path:
    """Write results.json, predictions.jsonl, report.md, frontier.png and agreement.png into `out_dir`.

    Example: `write_outputs(results, records, "eval-out")`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_NAME).write_text(dumps_results(results))
    with (out / PREDICTIONS_NAME).open("w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown_report(results))
    plot_frontier([results], out / "frontier.png")
    plot_agreement(results, out / "agreement.png")
    logger.info("wrote %s", out)
    return out


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json (or the directory holding one).

    Example: `read_results("eval-out")["ks"]`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_NAME
    if not path.is_file():
        raise ValueError(f"no results file at {path}")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if "tasks" not in results or "ks" not in results:
        raise ValueError(f"{path} is not a phds results.json (no 'tasks'/'ks')")
    return results
