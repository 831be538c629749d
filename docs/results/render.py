"""Render the README's result sections from the committed results.json files, so no number in it is typed.

    python docs/results/render.py           # rewrite the README's marked sections in place
    python docs/results/render.py --check   # exit 1 when the README disagrees with the committed results

Each section sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`, and is rendered from
`docs/results/NAME/results.json` by `phds.experiment.report` (the same tables as the run's own report.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from phds.experiment.report import markdown_summary, markdown_tables

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
SECTION = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.DOTALL)


def render_section(name: str) -> str:
    """The Markdown of one committed experiment: what ran, the verdicts, the tables, and how to reproduce it."""
    results = json.loads((RESULTS / name / "results.json").read_text())
    provenance = results["provenance"]
    versions = ", ".join(f"{package} {version}" for package, version in provenance["versions"].items() if version)
    spec = results["spec"]
    lines = [
        f"Committed run: `{provenance['command']}` — {len(results['seeds'])} SFT seeds per arm "
        f"({', '.join(str(s) for s in results['seeds'])}), checkpoint rule **{spec['checkpoint']}**, margins "
        f"declared before the run: {', '.join(f'{m} {v:g}' for m, v in spec['margin'].items())}; "
        f"{provenance['minutes_to_compute']} min on {provenance['machine']} ({provenance['jobs']} jobs). "
        f"Versions: {versions}. Full report: [docs/results/{name}/report.md](docs/results/{name}/report.md).",
        "",
        *markdown_summary(results),
        "",
        markdown_tables(results).rstrip(),
        "",
    ]
    return "\n".join(lines)


def render(readme: str) -> str:
    """`readme` with every marked results section re-rendered."""
    return SECTION.sub(lambda m: m.group(1) + render_section(m.group("name")) + m.group(4), readme)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the README is stale")
    args = parser.parse_args()
    path = ROOT / "README.md"
    current = path.read_text()
    rendered = render(current)
    if args.check:
        if rendered != current:
            print("README.md's results sections differ from docs/results/*/results.json: run docs/results/render.py")
            return 1
        return 0
    path.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
