"""Render `phds bench` JSON files as the Markdown tables of docs/performance.md.

Run: `python benchmarks/render_markdown.py benchmarks/results/decode_2threads.json benchmarks/results/train.json`.
"""

from __future__ import annotations

import json
import sys

from phds.engine.benchmark import result_tables, run_summary


def render(results: dict) -> str:
    lines = [run_summary(results), ""]
    for title, header, rows in result_tables(results):
        lines += [f"*{title}*", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines.append(f"Goals as evaluated by the run: `{json.dumps(results['goals'])}`\n")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"<!-- {path} -->")
        with open(path) as file:
            print(render(json.load(file)))
