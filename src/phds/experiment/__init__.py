"""Experiments: arms × seeds, trained and evaluated identically, judged run by run against a declared margin.

    spec = phds.experiment.load_spec("experiment.toml", "runs/exp")
    result = phds.experiment.run_experiment(spec, "runs/exp")
    result.results["tasks"]["eval_mc"]["comparisons"]   # per k and baseline arm: Δ over seeds, interval, verdict

`phds experiment SPEC --out DIR` is the same from the shell; `phds demo` runs the built-in spec `demo.toml`.
"""

from phds.experiment.run import ExperimentResult, plan, run_experiment
from phds.experiment.spec import Arm, Data, ExperimentSpec, Pretrain, load_spec, read_spec_file
from phds.experiment.stats import compare_runs, hierarchical_bootstrap, t_interval, verdict

__all__ = [
    "Arm",
    "Data",
    "ExperimentResult",
    "ExperimentSpec",
    "Pretrain",
    "compare_runs",
    "hierarchical_bootstrap",
    "load_spec",
    "plan",
    "read_spec_file",
    "run_experiment",
    "t_interval",
    "verdict",
]
