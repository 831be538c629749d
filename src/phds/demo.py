"""`phds demo`: the paper's experiment as a multi-seed experiment, on a CPU in minutes, with nothing downloaded.

The demo is the built-in spec `phds/experiment/specs/demo.toml` run by `phds.experiment`:

    data       the synthetic skills (reverse, sort, sequence, copy), seeded, character level
    base       a tiny OLMoE-architecture MoE (16 experts, k_pre = 4) pretrained from scratch on them
    runs       per SFT seed: PHDS over K = {1, 2, 3, 4}, one fixed-k oracle per k (the one at k_pre is also the
               ordinary SFT that the `sft-dialled` arm dials down), all with the same data, steps and lr
    eval       every run at the ks its arms need, and the base model at every k in K
    analysis   run-level differences of PHDS vs every arm at every k, verdicts against the declared margin,
               agreement across k against its fair baselines; OUT/report.md and OUT/results.json

`quick=True` runs 2 seeds with fewer steps: indicative only, and says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phds.experiment import ExperimentResult, ExperimentSpec, run_experiment
from phds.experiment.spec import merge, read_spec_file

DEMO_SPEC = Path(__file__).parent / "experiment" / "specs" / "demo.toml"

# `--quick`: the same pipeline with 2 seeds, fewer steps and a smaller evaluation (about 3 minutes on 2 cores).
QUICK = {
    "seeds": [0, 1],
    "base": {"pretrain": {"steps": 500}},
    "data": {"options": {"n_eval": 120}},
    "training": {"max_steps": 150, "eval_steps": 150, "save_steps": 150, "warmup_steps": 8},
}


def demo_spec(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seeds: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
) -> ExperimentSpec:
    """The demo's spec, optionally the quick variant, other seeds, or any other `overrides` (tables merge).

    Example: `demo_spec("phds-demo", seeds=[0, 1, 2, 3, 4])`.
    """
    data = read_spec_file(DEMO_SPEC)
    if quick:
        data = merge(data, QUICK)
        data["description"] += " Quick run (2 seeds, fewer steps): indicative only, not evidence."
    if seeds is not None:
        data["seeds"] = list(seeds)
    data = merge(data, overrides)
    return ExperimentSpec.from_dict(data, spec_dir=DEMO_SPEC.parent, out_dir=Path(out_dir))


def run_demo(
    out_dir: str | Path = "phds-demo",
    *,
    quick: bool = False,
    seeds: list[int] | None = None,
    jobs: int | None = None,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    say: Callable[[str], None] | None = None,
    command: str | None = None,
) -> ExperimentResult:
    """Run the demo experiment into `out_dir` (a re-run reuses finished stages); returns the experiment's result.

    Args:
        jobs: runs trained at the same time, one process and one thread each (default: the number of cores, at
            most 4: the demo's tiny matmuls gain nothing from intra-op threads, and a lot from parallel runs).

    Example: `phds.demo.run_demo("phds-demo", quick=True).summary`.
    """
    spec = demo_spec(out_dir, quick=quick, seeds=seeds, overrides=overrides)
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    return run_experiment(spec, out_dir, force=force, jobs=jobs, threads=1, say=say, command=command)
