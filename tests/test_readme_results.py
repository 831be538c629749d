"""The README's numbers are rendered from the committed results, never typed: a stale README fails here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "docs" / "results" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_results_sections_match_the_committed_results():
    render = load_renderer()
    readme = (ROOT / "README.md").read_text()
    sections = [m.group("name") for m in render.SECTION.finditer(readme)]
    assert "demo" in sections and "small-real" in sections
    assert render.render(readme) == readme, "README.md is stale: run `python docs/results/render.py`"


def test_the_committed_demo_run_has_five_seeds_and_records_its_versions():
    results = json.loads((ROOT / "docs" / "results" / "demo" / "results.json").read_text())
    assert results["seeds"] == [0, 1, 2, 3, 4]
    assert {"torch", "transformers", "trl", "moe-phds"} <= set(results["provenance"]["versions"])
    assert (ROOT / "docs" / "results" / "demo" / "constraints.txt").is_file()


def test_a_changed_number_is_caught(tmp_path):
    render = load_renderer()
    readme = (ROOT / "README.md").read_text()
    section = next(render.SECTION.finditer(readme))
    body = section.group("body")
    digit = next(i for i, c in enumerate(body) if c.isdigit())
    tampered = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1 :]
    stale = readme.replace(body, tampered, 1)
    assert render.render(stale) != stale
