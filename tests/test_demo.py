"""The demo pipeline at a very small size: every stage writes its documented files; a re-run reuses them."""

from __future__ import annotations

import json

import pytest

import phds
from phds.demo import DemoConfig, run_demo

TINY = dict(
    n_pretrain=300,
    n_sft=48,
    n_eval=12,
    pretrain_steps=3,
    sft_steps=2,
    ks=[2, 4],
    anchor_k=2,
    batch_size=8,
    num_experts=8,
    hidden_size=32,
    expert_size=32,
    latency=False,
    max_new_tokens=4,
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    said: list[str] = []
    first = run_demo(out, DemoConfig(**TINY), say=said.append)
    return out, first, said


def test_every_stage_writes_its_documented_files(demo_run):
    out, first, said = demo_run
    for name in ("pretrain.txt", "sft_train.jsonl", "sft_valid.jsonl", "eval_mc.jsonl", "eval_em.jsonl"):
        assert (out / "data" / name).is_file()
    assert phds.read_sidecar(out / "base" / "model").method == "base"
    assert (out / "sweep" / "results.json").is_file()
    assert sorted(json.loads((out / "sweep" / "results.json").read_text())["ks"]) == [1, 2, 3, 4]
    for name, method, ks in (("oracle-k2", "oracle", [2]), ("oracle-k4", "oracle", [4]), ("phds", "phds", [2, 4])):
        sidecar = phds.read_sidecar(out / "sft" / name / "model")
        assert (sidecar.method, sidecar.ks) == (method, ks)
        results = json.loads((out / "eval" / name / "results.json").read_text())
        assert set(results["tasks"]) == {"eval_mc", "eval_em"}
        assert (out / "eval" / name / "predictions.jsonl").is_file()
    assert (out / "compare" / "compare.json").is_file()
    report = (out / "report.md").read_text()
    assert "## Summary" in report and "Where PHDS falls short" in report and "robustness probe" in report
    assert (out / "frontier.png").is_file() and (out / "agreement.png").is_file()
    assert any("PHDS" in line and "oracle" in line for line in first.summary)
    assert len(first.stages_run) == 3 + 3 + 4 and first.stages_reused == []  # data, base, sweep; 3 SFT; 4 evals


def test_a_second_run_with_the_same_settings_reuses_every_stage(demo_run):
    out, first, _ = demo_run
    second = run_demo(out, DemoConfig(**TINY), say=lambda _: None)
    assert second.stages_run == [] and sorted(second.stages_reused) == sorted(first.stages_run)
    assert second.summary == first.summary


def test_changed_settings_redo_the_stages_they_invalidate(tmp_path):
    config = DemoConfig(**{**TINY, "seed": 1})
    assert config.digest() != DemoConfig(**TINY).digest()
    with pytest.raises(ValueError, match="anchor_k"):
        DemoConfig(**{**TINY, "anchor_k": 3})
