"""`phds demo`: the built-in spec is a multi-seed experiment with every baseline arm; a tiny run of it end to end."""

from __future__ import annotations

import json

import pytest

import phds
from phds.demo import demo_spec, run_demo

TINY = {
    "ks": [2, 4],
    "seeds": [0, 1],
    "base": {
        "pretrain": {
            "steps": 3,
            "batch_size": 8,
            "model": {"num_experts": 8, "hidden_size": 32, "intermediate_size": 32},
        }
    },
    "data": {"options": {"n_pretrain": 300, "n_sft": 48, "n_eval": 12}},
    "training": {
        "max_steps": 2,
        "eval_steps": 2,
        "save_steps": 2,
        "per_device_train_batch_size": 8,
        "warmup_steps": 0,
    },
    "evaluation": {"max_new_tokens": 4},
    "arms": [
        {"kind": "phds", "anchor_k": 2},
        {"kind": "sft-dialled"},
        {"kind": "base-dialled", "tasks": ["{out}/data/base_mc.jsonl", "{out}/data/base_em.jsonl"]},
    ],
}


def test_the_default_demo_runs_every_arm_at_three_seeds_with_a_declared_margin(tmp_path):
    spec = demo_spec(tmp_path)
    assert len(spec.seeds) >= 3 and max(spec.seeds) < 1000  # seeds >= 1000 are for tuning, never reported
    kinds = {arm.kind for arm in spec.arms}
    assert kinds == {"phds", "phds-layer", "oracle", "sft-dialled", "policy", "base-dialled"}
    policy = next(arm for arm in spec.arms if arm.kind == "policy")
    assert (policy.of, policy.policy, policy.budgets) == ("sft-dialled", "top_p", [2, 3])
    assert [arm.k for arm in spec.arms if arm.kind == "oracle"] == spec.ks
    assert spec.checkpoint == "final" and spec.margin_of("exact_match") > 0 and spec.margin_of("acc_norm") > 0
    quick = demo_spec(tmp_path, quick=True)
    assert len(quick.seeds) == 2 and "indicative" in quick.description
    assert quick.training["max_steps"] < spec.training["max_steps"]


# The end-to-end demo runs take about a minute of CPU: they are `slow` (CI's second step); tests/experiment covers
# the experiment machinery in the default run.
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    said: list[str] = []
    first = run_demo(out, overrides=TINY, jobs=1, say=said.append)
    return out, first, said


@pytest.mark.slow
def test_every_stage_writes_its_documented_files(demo_run):
    out, first, said = demo_run
    for name in ("pretrain.txt", "sft_train.jsonl", "sft_valid.jsonl", "eval_mc.jsonl", "base_em.jsonl"):
        assert (out / "data" / name).is_file()
    assert phds.read_sidecar(out / "base" / "model").method == "base"
    for run, method, ks in (("phds", "phds", [2, 4]), ("sft-dialled", "oracle", [4])):
        for seed in (0, 1):
            assert phds.read_sidecar(out / "runs" / run / f"seed{seed}" / "model").method == method
            assert phds.read_sidecar(out / "runs" / run / f"seed{seed}" / "model").ks == ks
    base_eval = json.loads((out / "eval" / "base" / "base-dialled-tasks" / "results.json").read_text())
    assert list(base_eval["tasks"]) == ["base_mc", "base_em"]  # the base model is asked in its own format
    results = json.loads((out / "results.json").read_text())
    assert {c["other"] for c in results["tasks"]["eval_em"]["comparisons"]} == {"sft-dialled", "base-dialled"}
    assert (out / "report.md").is_file() and (out / "frontier.png").is_file()
    assert any(line.startswith("phds vs each arm over 2 SFT seeds") for line in said)


@pytest.mark.slow
def test_a_second_run_with_the_same_settings_reuses_every_stage(demo_run):
    out, first, _ = demo_run
    second = run_demo(out, overrides=TINY, jobs=1, say=lambda _: None)
    assert second.stages_run == [] and sorted(second.stages_reused) == sorted(first.stages_run)
    assert second.summary == first.summary and second.results["tasks"] == first.results["tasks"]


@pytest.mark.slow
def test_a_new_seed_runs_only_its_own_stages(demo_run):
    out, first, _ = demo_run
    declared = json.loads((out / "spec.json").read_text())["declared"]
    more = run_demo(out, overrides={**TINY, "seeds": [0, 1, 2]}, jobs=1, say=lambda _: None)
    spec = json.loads((out / "spec.json").read_text())
    assert spec["declared"] == declared and spec["spec"]["seeds"] == [0, 1, 2]  # same judging rules, more seeds
    assert sorted(more.stages_run) == [
        "eval/phds/seed2",
        "eval/sft-dialled/seed2",
        "runs/phds/seed2",
        "runs/sft-dialled/seed2",
    ]
    assert more.results["seeds"] == [0, 1, 2]


@pytest.mark.slow
def test_parallel_jobs_give_the_same_results_as_one_process(demo_run, tmp_path):
    out, first, _ = demo_run
    parallel = run_demo(tmp_path / "parallel", overrides=TINY, jobs=2, say=lambda _: None)
    assert _without_wall_times(parallel.results["tasks"]) == _without_wall_times(first.results["tasks"])
    assert (tmp_path / "parallel" / "logs").is_dir()


def _without_wall_times(value):
    """Results with the measured seconds per answer left out: wall time differs between any two runs."""
    if isinstance(value, dict):
        return {key: _without_wall_times(item) for key, item in value.items() if key != "seconds_per_answer"}
    if isinstance(value, list):
        return [_without_wall_times(item) for item in value]
    return value
