"""Render `phds bench` JSON files as the Markdown tables of docs/performance.md.

Run: `python benchmarks/render_markdown.py benchmarks/results/decode.json benchmarks/results/train.json`.
"""

from __future__ import annotations

import json
import sys


def render(results: dict) -> str:
    lines = []
    machine, stock = results["machine"], results["config"]["stock"]
    lines.append(f"{machine['threads']} torch threads, measured read bandwidth {machine['bandwidth_GBps']:.1f} GB/s\n")
    if results["decode"]:
        lines.append(
            "| k | batch | engine ms/token | floor ms | engine / floor | "
            + " | ".join(f"stock {s} ms" for s in stock)
            + " | "
            + " | ".join(f"speed-up vs {s}" for s in stock)
            + " |"
        )
        lines.append("|" + "---|" * (5 + 2 * len(stock)))
        for row in results["decode"]:
            floor = f"{row['floor_ms']:.2f}" if "floor_ms" in row else "-"
            ratio = f"{row['x_floor']:.2f}" if "x_floor" in row else "-"
            lines.append(
                f"| {row['k']} | {row['batch']} | {row['engine_ms']:.2f} | {floor} | {ratio} | "
                + " | ".join(f"{row['stock_ms'][s]:.2f}" for s in stock)
                + " | "
                + " | ".join(f"{row['speedup'][s]:.2f}x" for s in stock)
                + " |"
            )
        lines.append("")
        lines.append(
            "| k | batch | prompt tokens | engine prefill tok/s | "
            + " | ".join(f"stock {s} tok/s" for s in stock)
            + " | engine / best stock |"
        )
        lines.append("|" + "---|" * (5 + len(stock)))
        for row in results["prefill"]:
            lines.append(
                f"| {row['k']} | {row['batch']} | {row['tokens']} | {row['engine_tok_s']:.0f} | "
                + " | ".join(f"{row['stock_tok_s'][s]:.0f}" for s in stock)
                + f" | {row['vs_best_stock']:.2f}x |"
            )
        lines.append("")
    mixed = results.get("mixed")
    if mixed:
        lines.append(
            f"Mixed-k batch (k = {mixed['ks']}, {mixed['tokens']} new tokens): {mixed['batched_tok_s']:.1f} tok/s as one "
            f"batch vs {mixed['sequential_tok_s']:.1f} tok/s one after another = **{mixed['speedup']:.2f}x**; outputs "
            f"identical to running each alone: {mixed['outputs_identical']}.\n"
        )
    if results["train"]:
        lines.append("| k | batch x seq | phds s/step | stock grouped_mm s/step | speed-up |")
        lines.append("|---|---|---|---|---|")
        for row in results["train"]:
            lines.append(
                f"| {row['k']} | {row['batch']}x{row['seq']} | {row['phds_s']:.3f} | "
                f"{row['grouped_mm_s']:.3f} | {row['speedup_vs_grouped_mm']:.2f}x |"
            )
        lines.append("")
    lines.append(f"Goals as evaluated by the run: `{json.dumps(results['goals'])}`\n")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"<!-- {path} -->")
        print(render(json.loads(open(path).read())))
