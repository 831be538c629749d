from __future__ import annotations

import json

import pytest
import torch

import phds
from phds.evaluation import LatencyConfig, evaluate
from phds.evaluation.agreement import agreement
from phds.evaluation.prompts import ItemRequests
from phds.evaluation.runner import _Prepared, _score_generation
from phds.evaluation.tasks import load_task

from .conftest import MC, write_jsonl

FAST_LATENCY = LatencyConfig(prompt_tokens=8, new_tokens=2, repeats=1)


@pytest.fixture(scope="module")
def run(tiny, task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    tasks = [
        str(task_dir / f) for f in ("mc.jsonl", "wino.jsonl", "lamb.jsonl", "gsm.jsonl", "simple.jsonl", "text.txt")
    ]
    results = evaluate(
        tiny,
        [1, 2, 4],
        tasks,
        out_dir=out,
        max_new_tokens=6,
        batch_size=3,
        max_length=64,
        latency=FAST_LATENCY,
        model_name="tiny-olmoe",
        progress=False,
    )
    return results, out


def test_results_hold_every_task_and_k_with_cis(run):
    results, _ = run
    assert results["ks"] == [1, 2, 4] and results["model"] == "tiny-olmoe" and results["method"] == "base"
    assert set(results["tasks"]) == {"mc", "wino", "lamb", "gsm", "simple", "text"}
    expected = {
        "mc": {"acc", "acc_norm"},
        "wino": {"acc"},
        "lamb": {"acc", "ppl"},
        "gsm": {"exact_match"},
        "simple": {"exact_match"},
        "text": {"ppl"},
    }
    for name, task in results["tasks"].items():
        for k in ("1", "2", "4"):
            assert set(task["metrics"][k]) == expected[name]
            for summary in task["metrics"][k].values():
                assert summary["ci_low"] <= summary["value"] <= summary["ci_high"]
                assert summary["n"] == task["n"]
    assert results["tasks"]["mc"]["n"] == len(MC)
    assert results["active_params"]["1"] < results["active_params"]["2"] < results["active_params"]["4"]
    latency = results["latency"]["2"]
    assert latency["prefill_tokens_per_s"] > 0 and latency["decode_ms_per_token"] >= 0
    assert latency["active_params"] == results["active_params"]["2"]


def test_agreement_matrices_are_symmetric_with_ones_on_the_diagonal(run):
    results, _ = run
    for task in results["tasks"].values():
        matrix = task["agreement"]["matrix"]
        assert task["agreement"]["ks"] == [1, 2, 4]
        for i in range(3):
            assert matrix[i][i] == 1.0
            for j in range(3):
                assert matrix[i][j] == matrix[j][i] and 0.0 <= matrix[i][j] <= 1.0


def test_dialling_k_changes_the_scores(run):
    text = run[0]["tasks"]["text"]
    assert text["metrics"]["1"]["ppl"]["value"] != text["metrics"]["4"]["ppl"]["value"]
    assert text["agreement"]["matrix"][0][2] < 1.0


def test_a_model_at_k_agrees_with_itself_at_k_completely(tiny, task_dir, run):
    again = evaluate(
        tiny,
        [2],
        [str(task_dir / "mc.jsonl"), str(task_dir / "text.txt")],
        max_length=64,
        latency=False,
        progress=False,
    )
    for name in ("mc", "text"):
        first = run[0]["tasks"][name]["items"]["2"]["prediction"]
        assert agreement(first, again["tasks"][name]["items"]["2"]["prediction"], positionwise=name == "text") == 1.0
        assert again["tasks"][name]["metrics"]["2"] == run[0]["tasks"][name]["metrics"]["2"]


def test_outputs_are_written_with_every_prediction(run):
    results, out = run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"]["mc"]["metrics"] == results["tasks"]["mc"]["metrics"]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    per_task = {name: sum(r["task"] == name for r in records) for name in results["tasks"]}
    for name, task in results["tasks"].items():
        assert per_task[name] == 3 * task["n"]
    mc = next(r for r in records if r["task"] == "mc" and r["k"] == 4 and r["index"] == 1)
    assert (
        mc["line"] == 2
        and len(mc["logprobs"]) == 3
        and mc["prediction"] == max(range(3), key=mc["logprobs"].__getitem__)
    )
    report = (out / "report.md").read_text()
    assert "## mc (mc, n=5" in report and "agreement" in report and "decode ms/token" in report
    for plot in ("frontier.png", "agreement.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_restores_the_models_k(tiny, task_dir):
    model, tok = tiny
    phds.set_k(model, 3)
    evaluate((model, tok), [1], [str(task_dir / "mc.jsonl")], latency=False, progress=False)
    assert phds.get_k(model) == 3
    phds.set_k(model, 4)


def test_exact_match_compares_the_extracted_answer(task_dir):
    task = load_task(task_dir / "gsm.jsonl")
    prep = _Prepared.__new__(_Prepared)
    prep.task, prep.items = task, [ItemRequests(gold="5"), ItemRequests(gold="2")]
    columns, records = _score_generation(prep, [" 2+3=5. So 5 apples", " it is 3"], k=1)
    assert columns["exact_match"] == [1.0, 0.0] and columns["prediction"] == ["5", "3"]
    simple = load_task(task_dir / "simple.jsonl")
    prep.task, prep.items = simple, [ItemRequests(gold="2"), ItemRequests(gold="4")]
    columns, _ = _score_generation(prep, ["2 ", " 42"], k=1)
    assert columns["exact_match"] == [1.0, 0.0]


def test_bad_input_fails_before_any_model_work(tiny, task_dir, tmp_path):
    model, tok = tiny
    bad_gold = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 5}])
    # a model path that does not exist: the task error must come first
    with pytest.raises(ValueError, match="gold index 5 out of range"):
        evaluate("/nonexistent/model", [1], [str(bad_gold)])
    with pytest.raises(ValueError, match="unknown task|no such file"):
        evaluate("/nonexistent/model", [1], [str(tmp_path / "missing.jsonl")])
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"number of experts \(8\), got ks=\[2, 9\]: \[9\] too large"):
        evaluate((model, tok), [2, 9], [str(task_dir / "mc.jsonl")], progress=False)
    with pytest.raises(ValueError, match=r"`ks` must not repeat a k, got ks=\[2, 2\]"):
        evaluate((model, tok), [2, 2], [str(task_dir / "mc.jsonl")], progress=False)
    assert phds.get_k(model) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="`limit` must be >= 1"):
        evaluate((model, tok), [2], [str(task_dir / "mc.jsonl")], limit=0)


def test_a_saved_checkpoint_brings_its_sidecar_and_declared_ks(tiny, task_dir, tmp_path):
    model, tok = tiny
    phds.save(model, tmp_path / "ckpt", tokenizer=tok, sidecar=phds.Sidecar(ks=[1, 2], k_pre=4, method="phds"))
    results = evaluate(
        str(tmp_path / "ckpt"),
        None,
        [str(task_dir / "mc.jsonl")],
        limit=2,
        latency=False,
        device="cpu",
        progress=False,
    )
    assert results["ks"] == [1, 2] and results["method"] == "phds" and results["sidecar"]["ks"] == [1, 2]
    assert results["tasks"]["mc"]["n"] == 2


def test_few_shot_prompts_change_the_scores_and_are_reproducible(tiny, task_dir, tmp_path):
    mc = [str(task_dir / "mc.jsonl")]

    def logprobs(out, **kwargs):
        evaluate(tiny, [2], mc, out_dir=tmp_path / out, latency=False, progress=False, **kwargs)
        lines = (tmp_path / out / "predictions.jsonl").read_text().splitlines()
        return [json.loads(line)["logprobs"] for line in lines]

    zero, two, again = logprobs("zero"), logprobs("two", num_fewshot=2), logprobs("again", num_fewshot=2)
    assert two == again
    assert all(a != b for a, b in zip(zero, two, strict=True))
