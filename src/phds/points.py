"""Operating points: the ways a loaded MoE can be run with fewer experts, each with a label for results files.

A point is a global int k, a routing policy (`TopP`, `Skip`: a per-token k from the router's scores) or a per-layer
allocation `{layer_index: k}` (what `phds allocate` writes). Evaluation, experiments and reports key every result by
the point's label: `"2"`, `"top_p=0.7"`, `"skip=0.3,k_max=4"`, `"layers=0:2,1:3"`. Int labels are the plain
numbers results files always used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from phds.policies import Policy, Skip, TopP, parse_policy

Point = int | TopP | Skip | Mapping[int, int]

_LAYERS = re.compile(r"^\s*layers\s*=\s*(\d+\s*:\s*\d+(?:\s*,\s*\d+\s*:\s*\d+)*)\s*$")


def point_label(point: Point) -> str:
    """The label a point's results are stored under.

    Example: `point_label({0: 2, 1: 3}) == "layers=0:2,1:3"`; `point_label(TopP(0.7)) == "top_p=0.7"`.
    """
    if isinstance(point, (TopP, Skip)):
        return str(point)
    if isinstance(point, Mapping):
        return "layers=" + ",".join(f"{index}:{point[index]}" for index in sorted(point))
    return str(int(point))


def is_policy(point: Point) -> bool:
    return isinstance(point, (TopP, Skip))


def parse_point(text: str) -> Point:
    """A point from its label, or from the path of an allocation file written by `phds allocate`.

    Example: `parse_point("top_p=0.7")`, `parse_point("3")`, `parse_point("alloc.json")`.
    """
    text = text.strip()
    if text.isdigit():
        return int(text)
    if text.startswith(("top_p", "skip")):
        return parse_policy(text)
    match = _LAYERS.match(text)
    if match:
        pairs = [pair.split(":") for pair in match.group(1).split(",")]
        return {int(index): int(k) for index, k in pairs}
    if text.endswith(".json") or os.path.sep in text:
        from phds.allocation import load_allocation

        if not Path(text).is_file():
            raise ValueError(f"allocation file {text!r} does not exist; write one with `phds allocate`")
        return load_allocation(text)
    raise ValueError(
        f"an operating point is a k like '2', a policy like 'top_p=0.7' or 'skip=0.3', a per-layer 'layers=0:2,1:3' "
        f"or an allocation .json from `phds allocate`, got {text!r}"
    )


__all__ = ["Point", "Policy", "is_policy", "parse_point", "point_label"]
