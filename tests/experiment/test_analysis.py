"""The verdict logic on constructed predictions whose answer is known: a two-seed, two-arm experiment whose
evaluations are written by hand, then analysed exactly as `run_experiment` analyses real runs."""

from __future__ import annotations

import json

import pytest

from phds.experiment import ExperimentSpec, plan
from phds.experiment.analysis import analyse
from phds.experiment.report import markdown_tables, summary_lines
from phds.experiment.spec import Arm, Data

N = 100


def spec_for(tmp_path) -> ExperimentSpec:
    return ExperimentSpec(
        name="constructed",
        ks=[2, 4],
        seeds=[0, 1],
        arms=[Arm(kind="phds"), Arm(kind="sft-dialled")],
        data=Data(train="unused.jsonl", tasks=[str(tmp_path / "easy.jsonl"), str(tmp_path / "hard.jsonl")]),
        base_model="unused",
        margin={"acc_norm": 0.03},
    )


def columns(n_correct: int, predictions: list[int]) -> dict[str, list]:
    acc = [1.0] * n_correct + [0.0] * (N - n_correct)
    return {"acc": acc, "acc_norm": acc, "prediction": predictions}


def write_eval(out, folder: str, per_task: dict[str, dict[int, dict]]) -> None:
    tasks = {
        name: {"kind": "mc", "primary": "acc_norm", "n": N, "items": {str(k): c for k, c in by_k.items()}}
        for name, by_k in per_task.items()
    }
    path = out / "eval" / folder
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"tasks": tasks}))


@pytest.fixture
def analysed(tmp_path):
    spec = spec_for(tmp_path)
    the_plan = plan(spec, k_pre=4)
    assert set(the_plan.runs) == {"phds", "sft-dialled"}
    (tmp_path / "spec.json").write_text(json.dumps({"declared": "then", "spec": spec.to_dict()}))
    for run in the_plan.runs:
        for seed in spec.seeds:
            stage = tmp_path / "runs" / run / f"seed{seed}"
            stage.mkdir(parents=True)
            (stage / "stage.json").write_text(json.dumps({"selected_step": 10, "steps": 10}))
    same, half = [0] * N, [0] * (N // 2) + [1] * (N // 2)
    # easy: PHDS far ahead at k=2 (better), a hair behind at k=4 (non-inferior: 1 point < the 3-point margin).
    # hard: PHDS 10 points behind at k=2 in both runs (worse); at k=4 ahead in one run and behind in the other by 10
    # points (inconclusive). PHDS predicts the same at both ks; the ordinary SFT changes half of its answers.
    phds = {
        0: {
            "easy": {2: columns(90, same), 4: columns(79, same)},
            "hard": {2: columns(40, same), 4: columns(60, same)},
        },
        1: {
            "easy": {2: columns(90, same), 4: columns(79, same)},
            "hard": {2: columns(40, same), 4: columns(40, same)},
        },
    }
    sft = {
        s: {"easy": {2: columns(70, same), 4: columns(80, half)}, "hard": {2: columns(50, same), 4: columns(50, half)}}
        for s in (0, 1)
    }
    for seed in spec.seeds:
        write_eval(tmp_path, f"phds/seed{seed}", phds[seed])
        write_eval(tmp_path, f"sft-dialled/seed{seed}", sft[seed])
    return analyse(spec, the_plan, tmp_path)


def verdicts(results, task):
    return {c["k"]: (round(c["mean"], 6), c["verdict"]) for c in results["tasks"][task]["comparisons"]}


def test_verdicts_on_constructed_runs_are_the_known_answers(analysed):
    assert verdicts(analysed, "easy") == {2: (0.2, "better"), 4: (-0.01, "non-inferior")}
    assert verdicts(analysed, "hard") == {2: (-0.1, "worse"), 4: (0.0, "inconclusive")}
    hard_k4 = next(c for c in analysed["tasks"]["hard"]["comparisons"] if c["k"] == 4)
    assert hard_k4["per_seed"] == pytest.approx([0.1, -0.1]) and hard_k4["low"] < -0.5 < 0.5 < hard_k4["high"]


def test_self_agreement_is_compared_run_by_run(analysed):
    agreement = analysed["tasks"]["easy"]["agreement"]
    assert agreement["self"]["phds"]["mean"] == 1.0 and agreement["self"]["sft-dialled"]["mean"] == 0.5
    assert agreement["reference_vs"]["sft-dialled"]["mean"] == pytest.approx(0.5)
    assert agreement["reference_vs"]["sft-dialled"]["verdict"] == "better"


def test_scores_keep_every_run(analysed):
    score = analysed["tasks"]["hard"]["scores"]["phds"]["4"]
    assert score["per_seed"] == {"0": 0.6, "1": 0.4} and score["mean"] == pytest.approx(0.5)
    assert analysed["runs"]["phds"]["seeds"]["1"]["selected_step"] == 10


def test_report_tables_and_summary_say_the_verdicts(analysed):
    tables = markdown_tables(analysed)
    for word in ("**better**", "**non-inferior**", "**worse**", "**inconclusive**"):
        assert word in tables
    summary = "\n".join(summary_lines(analysed))
    assert "vs sft-dialled: 1 better, 1 non-inferior, 1 worse, 1 inconclusive" in summary
    assert "only 2 seed(s)" in summary


def test_oracles_cross_k_agreement_is_shown_beside_its_same_k_floor(tmp_path):
    spec = ExperimentSpec(
        name="oracles",
        ks=[2, 4],
        seeds=[0, 1],
        arms=[Arm(kind="phds"), Arm(kind="oracle")],
        data=Data(train="unused.jsonl", tasks=[str(tmp_path / "easy.jsonl")]),
        base_model="unused",
    )
    the_plan = plan(spec, k_pre=4)
    (tmp_path / "spec.json").write_text(json.dumps({"declared": "then", "spec": spec.to_dict()}))
    for run in the_plan.runs:
        for seed in spec.seeds:
            (tmp_path / "runs" / run / f"seed{seed}").mkdir(parents=True)
            (tmp_path / "runs" / run / f"seed{seed}" / "stage.json").write_text("{}")
    zeros, half, quarter = [0] * N, [0] * (N // 2) + [1] * (N // 2), [1] * (N // 4) + [0] * (3 * N // 4)
    for seed in spec.seeds:
        write_eval(tmp_path, f"phds/seed{seed}", {"easy": {2: columns(50, zeros), 4: columns(50, zeros)}})
        write_eval(tmp_path, f"oracle-k2/seed{seed}", {"easy": {2: columns(50, zeros)}})
        # oracle-k4 differs from oracle-k2 on half (seed 0) or a quarter (seed 1) of the items; its two seeds agree on
        # a quarter of them
        write_eval(tmp_path, f"oracle-k4/seed{seed}", {"easy": {4: columns(50, half if seed == 0 else quarter)}})
    agreement = analyse(spec, the_plan, tmp_path)["tasks"]["easy"]["agreement"]
    assert agreement["oracles_cross_k"]["per"] == {"0": 0.5, "1": 0.75}
    # across seeds too: oracle-k2 seed 0 vs oracle-k4 seed 1 (a quarter differ)
    assert agreement["oracles_cross_k_other_seeds"]["per"] == {"0-1": 0.75}
    # same k, other seed: oracle-k2's seeds agree on everything, oracle-k4's on a quarter of the items
    assert agreement["same_k_floor"]["oracle-k4"]["per"] == {"0-1": 0.25}
    assert agreement["oracles_same_k_floor"]["mean"] == pytest.approx((1.0 + 0.25) / 2)
    assert agreement["self"]["phds"]["mean"] == 1.0 and agreement["reference_vs"] == {}
