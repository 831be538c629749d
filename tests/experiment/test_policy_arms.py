"""Arms beyond PHDS and oracles: layer-wise k sampling, and another arm's checkpoints run with a routing policy
calibrated per run to each budget — compared at equal measured compute with the same statistics."""

from __future__ import annotations

import json

import pytest

from phds.experiment import load_spec, plan, run_experiment
from phds.loading import read_sidecar

from .test_run import write_spec

ARMS = {
    "arms": [
        {"kind": "phds"},
        {"kind": "phds-layer"},
        {"kind": "sft-dialled"},
        {"kind": "policy", "of": "sft-dialled", "policy": "top_p", "budgets": [2]},
        {"kind": "policy", "of": "phds", "policy": "skip"},
    ]
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy-experiment")
    out = folder / "out"
    spec = load_spec(write_spec(folder), out, ARMS)
    return spec, out, run_experiment(spec, out, say=lambda _: None, command="test")


@pytest.mark.slow
def test_policy_arms_reuse_their_checkpoints_and_phds_layer_trains_its_own(experiment):
    spec, out, _ = experiment
    the_plan = plan(spec, k_pre=4)
    assert set(the_plan.runs) == {"phds", "phds-layer", "sft-dialled"}
    assert the_plan.runs["phds-layer"].fields["k_sampling"] == "layer"
    assert the_plan.run_of_arm["sft-dialled+top_p"] == "sft-dialled" and the_plan.run_of_arm["phds+skip"] == "phds"
    assert the_plan.ks_of_arm["phds+skip"] == [2]  # default budgets: the ks below k_pre
    sidecar = read_sidecar(out / "runs" / "phds-layer" / "seed0" / "model")
    assert sidecar.made_by["k_sampling"] == "layer"


@pytest.mark.slow
def test_a_policy_arm_is_calibrated_per_run_on_the_validation_split_and_judged_at_its_budget(experiment):
    _, out, result = experiment
    for seed in (0, 1):
        evaluated = json.loads(
            (out / "eval" / "sft-dialled" / f"seed{seed}" / "sft-dialled+top_p" / "results.json").read_text()
        )
        calibration = evaluated["calibration"]["2"]
        assert calibration["policy"].startswith("top_p=") and abs(calibration["calibration_mean"] - 2) <= 0.05
        assert evaluated["points"] == [calibration["policy"]]
    results = json.loads((out / "results.json").read_text())
    arm = next(a for a in results["arms"] if a["name"] == "sft-dialled+top_p")
    assert arm["kind"] == "policy" and set(arm["calibration"]) == {"0", "1"}
    for task in results["tasks"].values():
        others = {(c["k"], c["other"]) for c in task["comparisons"]}
        assert {(2, "sft-dialled+top_p"), (2, "phds+skip"), (2, "phds-layer"), (4, "phds-layer")} <= others
        measured = task["scores"]["sft-dialled+top_p"]["2"]["compute"]
        assert 1.0 <= measured["active_experts"] <= 4.0  # measured on the task, not the calibration target
        fixed = task["scores"]["sft-dialled"]["2"]["compute"]
        assert fixed["active_experts"] == 2.0 and fixed["active_params"] > 0
    report = (out / "report.md").read_text()
    assert "Ranked per budget" in report and "| 2 | 1 |" in report and "sft-dialled+top_p" in report


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        ({"kind": "policy", "policy": "top_p"}, "needs `of`"),
        ({"kind": "policy", "of": "sft-dialled", "policy": "top_k"}, "needs `of`"),
        ({"kind": "policy", "of": "nobody", "policy": "skip"}, "single-checkpoint arm"),
        ({"kind": "policy", "of": "sft-dialled", "policy": "skip", "budgets": [3]}, "must be among the ks"),
        ({"kind": "sft-dialled", "policy": "skip"}, "only a policy arm"),
    ],
)
def test_bad_policy_arms_are_refused_before_anything_runs(tmp_path, arm, message):
    arms = {"arms": [{"kind": "phds"}, {"kind": "sft-dialled"}, arm]}
    with pytest.raises(ValueError, match=message):
        load_spec(write_spec(tmp_path), tmp_path / "out", arms)
