from __future__ import annotations

import copy
import json

import pytest

from phds.evaluation import compare, evaluate, sweep
from phds.evaluation.metrics import summarise
from phds.evaluation.report import read_results
from phds.evaluation.sweep import verdict


def _synthetic(model: str, method: str, per_k_acc: dict[int, list[float]], sidecar_ks=None) -> dict:
    """A results dict with one mc task whose per-item accuracy (and predictions) we choose."""
    ks = sorted(per_k_acc)
    items = {
        str(k): {"prediction": [int(a) for a in acc], "acc": acc, "acc_norm": acc} for k, acc in per_k_acc.items()
    }
    metrics = {str(k): {m: summarise(m, items[str(k)]) for m in ("acc", "acc_norm")} for k in ks}
    return {
        "model": model,
        "method": method,
        "ks": ks,
        "k_pre": 4,
        "num_experts": 8,
        "sidecar": {"ks": sidecar_ks or ks, "method": method} if method != "base" else None,
        "active_params": {str(k): 1000 * k for k in ks},
        "latency": {},
        "settings": {"seed": 0},
        "tasks": {
            "mc": {
                "kind": "mc",
                "n": len(per_k_acc[ks[0]]),
                "digest": "same-items",
                "primary": "acc_norm",
                "higher_is_better": True,
                "metrics": metrics,
                "items": items,
                "agreement": {"ks": ks, "matrix": [[1.0 if i == j else 0.5 for j in ks] for i in ks]},
            }
        },
    }


GOOD = [1.0] * 36 + [0.0] * 4
BAD = [0.0] * 30 + [1.0] * 10


def test_verdict_names_the_k_where_quality_falls_off():
    results = _synthetic("m", "base", {1: BAD, 2: GOOD, 4: GOOD})
    line, detail = verdict(results)
    assert "holds down to k=2" in line and "falls off at k=1" in line and "mc acc_norm 0.900 -> 0.250" in line
    assert detail["ks"]["1"]["mc"]["worse"] and not detail["ks"]["2"]["mc"]["worse"]
    assert "holds at every k down to 1" in verdict(_synthetic("m", "base", {1: GOOD, 4: GOOD}))[0]


def test_compare_marks_significant_and_not_significant_differences(tmp_path):
    phds_result = _synthetic("phds-model", "phds", {1: GOOD, 2: GOOD})
    worse = _synthetic("base-model", "base", {1: BAD, 2: GOOD})
    out = compare([worse, phds_result], tmp_path / "cmp")
    assert out["reference"] == "phds-model (phds)"
    rows = {row["k"]: row for row in out["tasks"]["mc"]}
    assert rows[1]["diffs"]["base-model"]["significant"] and rows[1]["diffs"]["base-model"]["diff"] == pytest.approx(
        -0.65
    )
    assert not rows[2]["diffs"]["base-model"]["significant"]
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "+0.000 [+0.000, +0.000] n.s." in text and "-0.650" in text
    assert (tmp_path / "cmp" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["models"] == out["models"]


def test_compare_recognises_oracles_at_their_own_k():
    phds_result = _synthetic("phds-model", "phds", {1: GOOD, 2: GOOD})
    phds_result["tasks"]["mc"]["agreement"]["matrix"] = [[1.0, 0.9], [0.9, 1.0]]
    oracle1 = _synthetic("o1", "oracle", {1: BAD})
    oracle2 = _synthetic("o2", "oracle", {2: GOOD})
    out = compare([phds_result, oracle1, oracle2])
    vs = {row["k"]: row for row in out["oracle_vs_phds"]}
    assert vs[1]["oracle"] == "o1 (oracle k=1)" and vs[1]["diff"]["significant"] and vs[1]["diff"]["diff"] > 0
    assert not vs[2]["diff"]["significant"]
    (row,) = out["agreement"]
    # oracle-1 predicts BAD's 0/1 pattern at k=1, oracle-2 GOOD's at k=2: they agree on 36 - 30 + ... items
    expected = sum(a == b for a, b in zip(BAD, GOOD, strict=True)) / len(GOOD)
    assert (row["k"], row["k2"], row["phds"]) == (1, 2, 0.9) and row["oracles"] == pytest.approx(expected)


def test_items_that_differ_are_not_paired():
    a = _synthetic("a", "phds", {1: GOOD})
    b = copy.deepcopy(_synthetic("b", "base", {1: GOOD}))
    b["tasks"]["mc"]["digest"] = "other-items"
    assert compare([a, b])["tasks"]["mc"][0]["diffs"]["b"] is None


def test_compare_needs_two_results_and_real_files(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        compare([_synthetic("a", "base", {1: GOOD})])
    with pytest.raises(ValueError, match="no results file"):
        read_results(tmp_path / "missing")


def test_sweep_probes_every_k_up_to_k_pre_and_writes_a_verdict(tiny, task_dir, tmp_path):
    results = sweep(tiny, tasks=[str(task_dir / "mc.jsonl")], out_dir=tmp_path, latency=False, progress=False)
    assert results["ks"] == [1, 2, 3, 4] and results["sweep"]["reference_k"] == 4
    assert results["verdict"].startswith("quality holds")
    assert (tmp_path / "report.md").read_text().startswith("**verdict:** quality holds")
    assert json.loads((tmp_path / "results.json").read_text())["verdict"] == results["verdict"]


def test_compare_reads_results_written_by_evaluate(tiny, task_dir, tmp_path):
    for name, ks in (("a", [1, 2]), ("b", [2])):
        evaluate(
            tiny,
            ks,
            [str(task_dir / "mc.jsonl")],
            out_dir=tmp_path / name,
            latency=False,
            progress=False,
            model_name=name,
        )
    out = compare([tmp_path / "a", tmp_path / "b" / "results.json"], tmp_path / "cmp")
    row = next(r for r in out["tasks"]["mc"] if r["k"] == 2)
    assert row["diffs"]["b"]["diff"] == 0.0 and not row["diffs"]["b"]["significant"]
