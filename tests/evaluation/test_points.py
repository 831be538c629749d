"""Evaluation at operating points other than a global k: routing policies and per-layer allocations, each with the
compute it really used on each task."""

from __future__ import annotations

import pytest
import torch

from phds import dial
from phds.calibration import measure_mean_active
from phds.cli.common import parse_points
from phds.evaluation import evaluate
from phds.evaluation.runner import _Prepared
from phds.evaluation.tasks import load_task
from phds.points import parse_point, point_label
from phds.policies import Skip, TopP


@pytest.fixture(scope="module")
def run(tiny, task_dir):
    tasks = [str(task_dir / f) for f in ("mc.jsonl", "simple.jsonl")]
    points = [2, 4, TopP(0.4), Skip(0.8), {0: 1, 1: 4}]
    return evaluate(tiny, points, tasks, max_new_tokens=4, batch_size=2, max_length=64, latency=False, progress=False)


def test_every_point_has_metrics_agreement_and_measured_compute(run, tiny):
    labels = ["2", "4", "top_p=0.4", "skip=0.8", "layers=0:1,1:4"]
    assert run["ks"] == [2, 4] and run["points"] == labels
    for task in run["tasks"].values():
        assert list(task["metrics"]) == labels
        assert task["agreement"]["ks"] == [2, 4, *labels[2:]]
        compute = task["compute"]
        assert compute["2"]["active_experts"] == 2.0 and compute["layers=0:1,1:4"]["active_experts"] == 2.5
        # one token's parameters grow linearly with its experts: 1 + 4 experts cost what 2.5 + 2.5 cost
        assert compute["layers=0:1,1:4"]["active_params"] == pytest.approx(dial.active_parameters(tiny[0], 2.5))
        for label in ("top_p=0.4", "skip=0.8"):
            assert 1.0 <= compute[label]["active_experts"] <= 4.0
            expected = dial.active_parameters(tiny[0], compute[label]["active_experts"])
            assert compute[label]["active_params"] == pytest.approx(expected)
    assert run["tasks"]["simple"]["compute"]["4"]["tokens_per_answer"] >= 0
    assert run["tasks"]["simple"]["compute"]["4"]["seconds_per_answer"] > 0


def test_a_policy_reports_what_it_measured_on_that_task_without_padding(run, tiny, task_dir):
    model, tokenizer = tiny
    prep = _Prepared(
        load_task(task_dir / "mc.jsonl"), tokenizer, limit=None, num_fewshot=0, seed=0, max_len=64, ppl_stride=None
    )
    # the same sequences the scorer fed (the last continuation token is never fed), one per forward: no padding
    rows = [context + continuation[:-1] for context, continuation in prep.token_requests]
    batches = [(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), None) for row in rows]
    measured = measure_mean_active(model, Skip(0.8), batches)
    assert run["tasks"]["mc"]["compute"]["skip=0.8"]["active_experts"] == pytest.approx(measured, abs=1e-9)
    assert run["tasks"]["simple"]["compute"]["skip=0.8"]["active_experts"] != pytest.approx(measured)


def test_points_parse_from_their_labels_and_the_cli_text():
    for point in (3, TopP(0.7), Skip(0.3, k_max=4), {0: 2, 1: 3}):
        assert parse_point(point_label(point)) == point
    assert parse_points("1-2;skip=0.3;layers=0:1,1:2") == [1, 2, Skip(0.3), {0: 1, 1: 2}]
    with pytest.raises(ValueError, match="--k"):
        parse_points("top_q=0.3")


def test_a_bad_point_is_refused_before_any_forward(tiny, task_dir):
    with pytest.raises(ValueError, match="not MoE layers"):
        evaluate(tiny, [2, {7: 1}], [str(task_dir / "mc.jsonl")], latency=False, progress=False)
    assert dial.get_k(tiny[0]) == 4


def test_an_allocation_file_is_an_operating_point(tmp_path, tiny, task_dir):
    from phds.allocation import Allocation, save_allocation

    path = tmp_path / "alloc.json"
    save_allocation(Allocation(ks={0: 1, 1: 3}, budget=2.0, mean_k=2.0, loss_start=1.0, loss_end=1.2), path)
    point = parse_point(str(path))
    assert point == {0: 1, 1: 3} and parse_points(f"2;{path}") == [2, {0: 1, 1: 3}]
    results = evaluate(
        tiny, [point], [str(task_dir / "mc.jsonl")], latency=False, progress=False, out_dir=tmp_path / "o"
    )
    assert results["points"] == ["layers=0:1,1:3"] and results["ks"] == []
    assert results["tasks"]["mc"]["compute"]["layers=0:1,1:3"]["active_experts"] == 2.0
    assert "| layers=0:1,1:3 |" in (tmp_path / "o" / "report.md").read_text()
