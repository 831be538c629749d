"""Evaluation across k: quality per task, cross-k agreement, latency, reports, comparisons, lm-eval adapter.

Example: `phds.evaluation.evaluate("tiny:olmoe", [1, 2, 4], ["copa"], limit=20, out_dir="eval-out")`.
"""

from phds.evaluation.compare import compare
from phds.evaluation.latency import LatencyConfig, measure_latency
from phds.evaluation.runner import evaluate
from phds.evaluation.sweep import sweep

__all__ = ["LatencyConfig", "compare", "evaluate", "measure_latency", "sweep"]
