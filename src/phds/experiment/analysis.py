"""From per-run evaluations to run-level evidence: scores per arm and seed, paired differences with verdicts, and
cross-sparsity agreement with the baselines that make it meaningful.

Agreement is reported three ways, because "PHDS agrees with itself across k more than the oracles agree with each
other" mostly measures "one model vs several":
- **self-agreement** of an arm's run across its ks (mean over pairs k < k'), compared between the reference and
  every other single-checkpoint arm (`sft-dialled`, `base-dialled`) run by run — the fair comparison;
- the oracles' **cross-k agreement** (oracle-k at k vs oracle-k' at k', same seed, and across different seeds),
  shown beside
- its **same-k floor**: two oracles at the same k from different seeds; cross-k agreement across seeds near the
  floor says the oracles disagree across k because they are different models, not because of k.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from phds.evaluation.agreement import agreement
from phds.evaluation.metrics import METRICS
from phds.experiment.spec import ExperimentSpec
from phds.experiment.stats import Ratio, compare_runs, display_value, t_interval

SCHEMA_VERSION = 1


class Evaluations:
    """The per-run results.json files of an experiment, looked up by (arm, seed) and the spec's task position."""

    def __init__(self, spec: ExperimentSpec, the_plan, out: Path):
        self.spec, self.plan, self.out = spec, the_plan, out
        self._cache: dict[str, dict] = {}

    def results(self, arm: str, seed: int) -> dict[str, Any]:
        folder = self.plan.eval_of[(arm, seed)]
        if folder not in self._cache:
            path = self.out / "eval" / folder / "results.json"
            if not path.is_file():
                raise ValueError(f"{path} is missing: the evaluation of {arm} at seed {seed} has not run")
            self._cache[folder] = json.loads(path.read_text())
        return self._cache[folder]

    def task(self, arm: str, seed: int, position: int) -> dict[str, Any]:
        tasks = self.results(arm, seed)["tasks"]
        return tasks[list(tasks)[position]]

    def label(self, arm: str, seed: int, k: int) -> str:
        """Where an arm's results at k are stored: k itself, or for a policy arm the policy calibrated to budget k."""
        calibration = self.results(arm, seed).get("calibration")
        return calibration[str(k)]["policy"] if calibration else str(k)

    def columns(self, arm: str, seed: int, position: int, k: int) -> dict[str, list]:
        return self.task(arm, seed, position)["items"][self.label(arm, seed, k)]

    def compute(self, arm: str, seed: int, position: int, k: int) -> dict[str, Any]:
        """What the arm's run used at k on this task: measured experts per token, active parameters, ..."""
        return self.task(arm, seed, position).get("compute", {}).get(self.label(arm, seed, k), {})


def analyse(spec: ExperimentSpec, the_plan, out: Path) -> dict[str, Any]:
    """The experiment's results.json content: scores, comparisons and agreement per task (schema in
    docs/experiments.md).

    Example: `analyse(spec, plan(spec, k_pre=4), Path("runs/exp"))["tasks"]["eval_mc"]["comparisons"]`.
    """
    evals = Evaluations(spec, the_plan, out)
    declared = json.loads((out / "spec.json").read_text())
    tasks = {}
    for position, _ in enumerate(spec.data.tasks):
        reference_task = evals.task(spec.reference, spec.seeds[0], position)
        name = list(evals.results(spec.reference, spec.seeds[0])["tasks"])[position]
        tasks[name] = _analyse_task(spec, the_plan, evals, position, reference_task)
    return {
        "schema_version": SCHEMA_VERSION,
        "name": spec.name,
        "description": spec.description,
        "declared": declared["declared"],
        "spec": declared["spec"],
        "k_pre": the_plan.k_pre,
        "ks": spec.ks,
        "seeds": spec.seeds,
        "reference": spec.reference,
        "arms": [
            {
                "name": arm.name,
                "kind": arm.kind,
                "run": the_plan.run_of_arm[arm.name],
                "ks": the_plan.ks_of_arm[arm.name],
                **(
                    {"policy": arm.policy, "of": arm.of, "calibration": _calibrations(evals, arm.name, spec.seeds)}
                    if arm.kind == "policy"
                    else {}
                ),
            }
            for arm in spec.arms
        ],
        "runs": _runs(spec, the_plan, out),
        "tasks": tasks,
    }


def _calibrations(evals: Evaluations, arm: str, seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Per seed, the policy each budget was calibrated to and the mean it measured on the validation split."""
    return {str(seed): evals.results(arm, seed)["calibration"] for seed in seeds}


def _runs(spec: ExperimentSpec, the_plan, out: Path) -> dict[str, dict[str, Any]]:
    """Per training run and seed: the step the checkpoint rule chose, and the validation loss per k there."""
    runs = {}
    for run in the_plan.runs.values():
        runs[run.name] = {"fields": run.fields, "seeds": {}}
        for seed in spec.seeds:
            marker = json.loads((out / "runs" / run.name / f"seed{seed}" / "stage.json").read_text())
            runs[run.name]["seeds"][str(seed)] = {
                key: marker.get(key) for key in ("selected_step", "steps", "validation_loss", "train_loss")
            }
    return runs


def _analyse_task(spec, the_plan, evals: Evaluations, position: int, reference_task: dict) -> dict[str, Any]:
    metric = reference_task["primary"]
    higher = METRICS[metric]
    ratios: dict[str, dict[int, dict[int, Ratio]]] = {}  # arm -> k -> seed -> per-item scores
    for arm in spec.arms:
        ratios[arm.name] = {
            k: {seed: Ratio.of(metric, evals.columns(arm.name, seed, position, k)) for seed in spec.seeds}
            for k in the_plan.ks_of_arm[arm.name]
        }
    scores = {
        arm: {
            str(k): {**_score_summary(metric, by_seed), "compute": _compute_summary(evals, arm, position, k, by_seed)}
            for k, by_seed in by_k.items()
        }
        for arm, by_k in ratios.items()
    }
    comparisons = []
    reference = ratios[spec.reference]
    for arm in spec.arms:
        if arm.name == spec.reference:
            continue
        for k in sorted(set(reference) & set(ratios[arm.name])):
            difference = compare_runs(
                reference[k],
                ratios[arm.name][k],
                higher_is_better=higher,
                margin=spec.margin_of(metric),
                method=spec.statistics,
                confidence=spec.confidence,
            )
            comparisons.append({"k": k, "other": arm.name, "metric": metric, **difference.to_dict()})
    return {
        "kind": reference_task["kind"],
        "metric": metric,
        "higher_is_better": higher,
        "difference_scale": "log perplexity (mean NLL per token)" if metric == "ppl" else metric,
        "n": reference_task["n"],
        "scores": scores,
        "comparisons": comparisons,
        "agreement": _agreement(spec, the_plan, evals, position, reference_task["kind"] == "perplexity"),
    }


def _compute_summary(evals: Evaluations, arm: str, position: int, k: int, seeds) -> dict[str, float]:
    """Mean over seeds of what each run used at k (a policy's experts per token differ by run and task)."""
    per_seed = [evals.compute(arm, seed, position, k) for seed in seeds]
    keys = set.intersection(*(set(c) for c in per_seed)) if per_seed else set()
    return {
        key: float(np.mean([c[key] for c in per_seed]))
        for key in sorted(keys)
        if all(c[key] is not None for c in per_seed)
    }


def _score_summary(metric: str, by_seed: dict[int, Ratio]) -> dict[str, Any]:
    values = {seed: display_value(metric, ratio.value()) for seed, ratio in by_seed.items()}
    array = np.array(list(values.values()))
    return {
        "per_seed": {str(seed): value for seed, value in values.items()},
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if len(array) > 1 else None,
    }


def _agreement(spec, the_plan, evals: Evaluations, position: int, positionwise: bool) -> dict[str, Any]:
    def predictions(arm: str, seed: int, k: int) -> list:
        return evals.columns(arm, seed, position, k)["prediction"]

    def agree(a: list, b: list) -> float:
        return agreement(a, b, positionwise=positionwise)

    result: dict[str, Any] = {"self": {}, "reference_vs": {}}
    self_agreement: dict[str, dict[int, float]] = {}
    for arm in spec.arms:
        ks = the_plan.ks_of_arm[arm.name]
        if len(ks) < 2:
            continue
        per_seed = {
            seed: float(np.mean([agree(predictions(arm.name, seed, a), predictions(arm.name, seed, b))
                                 for a, b in itertools.combinations(ks, 2)]))
            for seed in spec.seeds
        }  # fmt: skip
        self_agreement[arm.name] = per_seed
        result["self"][arm.name] = _interval(per_seed.values(), spec.confidence, per_seed)
    reference = self_agreement.get(spec.reference)
    if reference is not None:
        for arm, per_seed in self_agreement.items():
            if arm == spec.reference:
                continue
            difference = compare_runs(
                {s: _Scalar(v) for s, v in reference.items()},
                {s: _Scalar(v) for s, v in per_seed.items()},
                higher_is_better=True,
                margin=0.0,
                method="t",
                confidence=spec.confidence,
            )
            result["reference_vs"][arm] = difference.to_dict()
    oracles = {arm.k: arm.name for arm in spec.arms if arm.kind == "oracle"}
    if len(oracles) >= 2:
        pairs = list(itertools.combinations(sorted(oracles), 2))
        cross = {
            seed: float(np.mean([agree(predictions(oracles[a], seed, a), predictions(oracles[b], seed, b))
                                 for a, b in pairs]))
            for seed in spec.seeds
        }  # fmt: skip
        result["oracles_cross_k"] = _interval(cross.values(), spec.confidence, cross)
        if len(spec.seeds) >= 2:
            # Runs with one seed share their data order, so same-seed pairs agree more than the different-seed floor
            # for that reason alone: across k *and* seeds is the like-for-like counterpart of the floor.
            across = {
                f"{s}-{t}": float(np.mean([agree(predictions(oracles[a], s, a), predictions(oracles[b], t, b))
                                           for a, b in pairs]))
                for s, t in itertools.combinations(spec.seeds, 2)
            }  # fmt: skip
            result["oracles_cross_k_other_seeds"] = _interval(across.values(), spec.confidence, across)
    result["same_k_floor"] = {}
    if len(spec.seeds) >= 2:
        seed_pairs = list(itertools.combinations(spec.seeds, 2))
        for arm in spec.arms:
            if the_plan.run_of_arm[arm.name] is None:
                continue  # one base model: nothing to compare across seeds
            ks = the_plan.ks_of_arm[arm.name]
            floor = {
                f"{s}-{t}": float(
                    np.mean([agree(predictions(arm.name, s, k), predictions(arm.name, t, k)) for k in ks])
                )
                for s, t in seed_pairs
            }
            result["same_k_floor"][arm.name] = _interval(floor.values(), spec.confidence, floor)
        if len(oracles) >= 2:
            oracle_floor = {
                pair: float(np.mean([result["same_k_floor"][name]["per"][pair] for name in oracles.values()]))
                for pair in (f"{s}-{t}" for s, t in seed_pairs)
            }
            result["oracles_same_k_floor"] = _interval(oracle_floor.values(), spec.confidence, oracle_floor)
    return result


class _Scalar(Ratio):
    """One number per run (a run's self-agreement) in the shape `compare_runs` takes."""

    def __init__(self, value: float):
        super().__init__(np.array([value]), np.array([1.0]))


def _interval(values, confidence: float, per: dict) -> dict[str, Any]:
    """Mean and t interval of agreement shares, clipped to [0, 1] where they lie."""
    mean, low, high = t_interval(list(values), confidence)
    low, high = (None, None) if low is None else (max(0.0, low), min(1.0, high))
    return {"mean": mean, "low": low, "high": high, "per": {str(key): value for key, value in per.items()}}
