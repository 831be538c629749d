"""`phds bench` results as text: the tables `phds bench` prints with rich and `benchmarks/render_markdown.py`
writes as Markdown, and a one-line summary of the run.
"""

from __future__ import annotations

import json


def result_tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The run's figures as (title, header, rows) tables of formatted cells: `phds bench` prints them with rich,
    `benchmarks/render_markdown.py` as Markdown."""
    stock = list(results["config"]["stock"])
    tables = []
    if results["decode"]:
        header = ["k", "batch", "engine ms", "floor ms", "engine / floor"]
        header += [f"{s} ms" for s in stock] + [f"vs {s}" for s in stock] + [f"{s} / floor" for s in stock]
        rows = []
        for row in results["decode"]:
            at_floor = row.get("floor_bound", {})
            rows.append(
                [str(row["k"]), str(row["batch"]), f"{row['engine_ms']:.2f}"]
                + [f"{row['floor_ms']:.3g}" if "floor_ms" in row else "-"]
                + [f"{row['x_floor']:.2f}" if "x_floor" in row else "-"]
                + [f"{row['stock_ms'][s]:.2f}" for s in stock]
                + [f"{row['speedup'][s]:.2f}x" for s in stock]
                + [f"{at_floor[s]:.2f}x" if s in at_floor else "-" for s in stock]
            )
        tables.append(("decode (ms per token per sequence; medians)", header, rows))
        header = ["k", "batch", "prompt tokens", "engine tok/s"] + [f"{s} tok/s" for s in stock] + ["vs best stock"]
        rows = [
            [str(row["k"]), str(row["batch"]), str(row["tokens"]), f"{row['engine_tok_s']:.0f}"]
            + [f"{row['stock_tok_s'][s]:.0f}" for s in stock]
            + [f"{row['vs_best_stock']:.2f}x" if row["vs_best_stock"] is not None else "-"]
            for row in results["prefill"]
        ]
        tables.append(("prefill (tokens/s; medians)", header, rows))
    mixed = results["mixed"]
    if mixed is not None:
        header = ["", "one batch tok/s", "one after another tok/s", "speed-up", "bandwidth bound"]
        rows = [
            [
                "decode",
                f"{mixed['batched_decode_tok_s']:.1f}",
                f"{mixed['sequential_decode_tok_s']:.1f}",
                f"{mixed['decode_speedup']:.2f}x",
                f"{mixed['floor_bound']:.2f}x",
            ],
            [
                "with prefill",
                f"{mixed['batched_tok_s']:.1f}",
                f"{mixed['sequential_tok_s']:.1f}",
                f"{mixed['speedup']:.2f}x",
                "-",
            ],
        ]
        title = (
            f"mixed-k batch k={mixed['ks']}: {mixed['distinct_experts_per_step']:.0f} experts (all layers) read per "
            f"batched step; outputs identical to each alone: {mixed['outputs_identical']}"
        )
        tables.append((title, header, rows))
    if results["train"]:
        header = ["k", "batch x seq", "phds s", "grouped_mm s", "speed-up"]
        rows = [
            [
                str(row["k"]),
                f"{row['batch']}x{row['seq']}",
                f"{row['phds_s']:.3f}",
                f"{row['grouped_mm_s']:.3f}",
                f"{row['speedup_vs_grouped_mm']:.2f}x",
            ]
            for row in results["train"]
        ]
        tables.append(("training step, forward + backward (s; medians)", header, rows))
    return tables


def run_summary(results: dict) -> str:
    """One line: the model and what the machine gave this run."""
    machine, info = results["machine"], results["model"]
    return (
        f"{info['class']} {info['parameters'] / 1e6:.0f}M params {info['dtype']}, {info['num_experts']} experts, "
        f"k_pre {info['k_pre']}; {machine['threads']} torch threads, measured read bandwidth "
        f"{machine['bandwidth_GBps']:.1f} GB/s"
        + (
            f"; engine compiled (warm-up {results['compile_s']:.0f} s, untimed)"
            if results["config"].get("compile")
            else ""
        )
    )


def markdown(results: dict) -> str:
    """The run summary, every table as Markdown, and the project's targets as checked on the run (when the results
    carry them), as docs/performance.md quotes them.

    Example: `print(markdown(json.load(open("benchmarks/results/decode_2threads.json"))))`.
    """
    lines = [run_summary(results), ""]
    for title, header, rows in result_tables(results):
        lines += [f"*{title}*", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    # "goals" is what runs before the targets moved out of the harness called them.
    targets = results.get("targets", results.get("goals"))
    if targets is not None:
        lines.append(f"Targets as checked on the run: `{json.dumps(targets)}`\n")
    return "\n".join(lines)
