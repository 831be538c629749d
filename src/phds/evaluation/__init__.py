"""Evaluation across k: quality per task, cross-k agreement, latency, reports, comparisons, lm-eval adapter.

Example: `phds.evaluation.evaluate("tiny:olmoe", [1, 2, 4], ["copa"], limit=20, out_dir="eval-out")`.
"""

from phds.evaluation.runner import evaluate

__all__ = ["evaluate"]
