"""A small real task from the shared data folder (skipped when it is absent)."""

from __future__ import annotations

from phds.evaluation import evaluate


def test_a_real_task_runs_end_to_end_with_a_limit(tiny, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PHDS_DATA", str(shared_data))
    results = evaluate(tiny, [1, 4], ["copa", "winogrande"], limit=6, out_dir=tmp_path, latency=False, progress=False)
    assert results["tasks"]["copa"]["n"] == 6 and results["tasks"]["winogrande"]["kind"] == "winogrande"
    assert results["tasks"]["copa"]["path"].endswith("eval/copa.jsonl")
    assert (tmp_path / "report.md").is_file()
