"""Render `phds bench` JSON files as the Markdown tables of docs/performance.md.

Run: `python benchmarks/render_markdown.py benchmarks/results/decode_2threads.json benchmarks/results/train_2threads.json`.
"""

from __future__ import annotations

import json
import sys

from phds.bench import markdown

if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"<!-- {path} -->")
        with open(path) as file:
            print(markdown(json.load(file)))
