"""`phds bench`: a measurement harness for the engine, decode / prefill / mixed-k / training speed per k against
stock transformers in the same run. Nothing in the engine imports it.

- `config`: `BenchConfig`, the model presets (`olmoe-shape-small`) and `build_model`;
- `measure`: the single measurements (bandwidth, floors, stock and engine decode, a training step);
- `run`: `bench()`, every measurement of a config, returned as JSON-ready figures;
- `targets`: this project's targets for those figures, checked apart from measuring them;
- `report`: the figures as tables (rich in the CLI, Markdown for docs/performance.md).

Example: `bench(BenchConfig(tiny_config="olmoe:num_experts=8", ks=[1, 4], repeats=1))["decode"][0]["engine_ms"]`.
"""

from phds.bench.config import DEFAULT_PRESET, PRESETS, BenchConfig, build_model
from phds.bench.report import markdown, result_tables, run_summary
from phds.bench.run import bench
from phds.bench.targets import TARGETS, check_targets

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "TARGETS",
    "BenchConfig",
    "bench",
    "build_model",
    "check_targets",
    "markdown",
    "result_tables",
    "run_summary",
]
