"""`run_experiment` and `phds experiment` end to end on a tiny spec: plan, stages, resume, declared rules."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from phds.cli import app
from phds.experiment import load_spec, plan, run_experiment

SPEC = """
name = "tiny"
ks = [2, 4]
seeds = [0, 1]
margin = {{ acc_norm = 0.05, exact_match = 0.05 }}
base = {{ model = "tiny:olmoe" }}
data = {{ train = "{{spec}}/sft.jsonl", valid = "{{spec}}/valid.jsonl", tasks = ["{{spec}}/quiz.jsonl", "{{spec}}/sums.jsonl"] }}
training = {{ max_steps = 2, per_device_train_batch_size = 4, max_length = 24, eval_steps = 2, save_steps = 2, warmup_steps = 0, report_to = "none", disable_tqdm = true }}
evaluation = {{ max_new_tokens = 3, batch_size = 8 }}
arms = [{{ kind = "phds" }}, {{ kind = "sft-dialled" }}, {{ kind = "base-dialled" }}]
{extra}
"""


def write_spec(folder, extra: str = "") -> str:
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(5) for b in range(5)]
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    quiz = [{"query": f"{a}+{a}=", "choices": [str(2 * a), str(2 * a + 1), "x"], "gold": 0} for a in range(6)]
    (folder / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in quiz))
    sums = [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(6)]
    (folder / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sums))
    path = folder / "spec.toml"
    path.write_text(SPEC.format(extra=extra))
    return str(path)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experiment")
    spec_path = write_spec(folder)
    out = folder / "out"
    result = run_experiment(load_spec(spec_path, out), out, say=lambda _: None, command="test")
    return spec_path, out, result


def test_an_ordinary_sft_at_k_pre_is_the_oracle_at_k_pre_under_the_final_step_rule(tmp_path):
    with_oracles = {"arms": [{"kind": "phds"}, {"kind": "oracle"}, {"kind": "sft-dialled"}, {"kind": "base-dialled"}]}
    spec = load_spec(write_spec(tmp_path), tmp_path / "out", with_oracles)
    the_plan = plan(spec, k_pre=4)
    assert set(the_plan.runs) == {"phds", "oracle-k2", "oracle-k4"}
    assert the_plan.run_of_arm["sft-dialled"] == "oracle-k4" and the_plan.run_of_arm["base-dialled"] is None
    assert the_plan.runs["oracle-k4"].fields["eval_ks"] == [2, 4]  # validated at every k its arms need
    selected = plan(load_spec(write_spec(tmp_path, 'checkpoint = "validation"'), tmp_path / "out", with_oracles), 4)
    assert set(selected.runs) == {"phds", "oracle-k2", "oracle-k4", "sft-dialled"}  # chosen differently: two runs
    assert selected.runs["sft-dialled"].fields == {"fixed_k": 4, "select_by": "mean", "eval_ks": [2, 4]}
    assert selected.runs["oracle-k2"].fields == {"fixed_k": 2, "select_by": "mean", "eval_ks": [2]}


def test_every_arm_is_trained_per_seed_evaluated_and_judged(experiment):
    _, out, result = experiment
    for run in ("phds", "sft-dialled"):
        for seed in (0, 1):
            marker = json.loads((out / "runs" / run / f"seed{seed}" / "stage.json").read_text())
            assert marker["selected_step"] == marker["steps"] == 2  # the final-step rule
            assert set(marker["validation_loss"]) == {"2", "4"}  # the ordinary SFT is validated at every k too
            assert (out / "eval" / run / f"seed{seed}" / "predictions.jsonl").is_file()
    assert json.loads((out / "eval" / "sft-dialled" / "seed0" / "results.json").read_text())["ks"] == [2, 4]
    results = json.loads((out / "results.json").read_text())
    assert results["spec"]["margin"] == {"acc_norm": 0.05, "exact_match": 0.05}
    quiz = results["tasks"]["quiz"]
    assert {(c["k"], c["other"]) for c in quiz["comparisons"]} == {
        (2, "sft-dialled"), (4, "sft-dialled"), (2, "base-dialled"), (4, "base-dialled"),
    }  # fmt: skip
    assert all(c["verdict"] in ("better", "non-inferior", "worse", "inconclusive") for c in quiz["comparisons"])
    assert all(c["per_seed"] and c["seeds"] == [0, 1] for c in quiz["comparisons"])
    assert set(quiz["agreement"]["self"]) == {"phds", "sft-dialled", "base-dialled"}
    assert set(quiz["agreement"]["same_k_floor"]) == {"phds", "sft-dialled"}
    assert results["provenance"]["versions"]["transformers"] and results["provenance"]["command"] == "test"
    report = (out / "report.md").read_text()
    assert "checkpoint rule **final**" in report and (out / "frontier.png").is_file()
    assert result.summary[0].startswith("phds vs each arm over 2 SFT seeds")


def test_a_rerun_reuses_every_stage_and_gives_the_same_results(experiment):
    spec_path, out, first = experiment
    second = run_experiment(load_spec(spec_path, out), out, say=lambda _: None, command="test")
    assert second.stages_run == [] and len(second.stages_reused) == len(first.stages_run)
    assert second.results["tasks"] == first.results["tasks"]


def test_judging_rules_cannot_change_once_runs_exist(experiment, tmp_path):
    spec_path, out, _ = experiment
    stricter = load_spec(spec_path, out, {"margin": {"acc_norm": 0.2}})
    with pytest.raises(ValueError, match="judging rules cannot change"):
        run_experiment(stricter, out, say=lambda _: None)
    assert json.loads((out / "spec.json").read_text())["spec"]["margin"]["acc_norm"] == 0.05


def test_the_cli_runs_a_spec_and_reports_bad_ones_in_one_line(experiment, tmp_path):
    spec_path, out, _ = experiment
    done = CliRunner().invoke(app, ["experiment", spec_path, "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "0 stages run" in done.output
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nks = [2]\nseeds = [0]\nbase = { model = "tiny:olmoe" }\nsurprise = 1\n')
    failed = CliRunner().invoke(app, ["experiment", str(bad), "--out", str(tmp_path / "o")])
    assert failed.exit_code == 2 and "unknown keys ['surprise']" in failed.output
    assert "Traceback" not in failed.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('reference = "nobody"', "`reference` must name an arm"),
        ('checkpoint = "best"', "`checkpoint` must be one of"),
        ('statistics = "z"', "`statistics` must be one of"),
    ],
)
def test_bad_specs_are_refused_before_anything_runs(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        load_spec(write_spec(tmp_path, extra), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_spec_errors_name_the_field(tmp_path):
    path = write_spec(tmp_path)
    with pytest.raises(ValueError, match="`training.seed` is set by the experiment"):
        load_spec(path, tmp_path / "out", {"training": {"seed": 3}})
    with pytest.raises(ValueError, match="not in `ks`"):
        load_spec(path, tmp_path / "out", {"arms": [{"kind": "phds"}, {"kind": "oracle", "k": 3}]})
    with pytest.raises(ValueError, match="`seeds` must be distinct"):
        load_spec(path, tmp_path / "out", {"seeds": [1, 1]})
    with pytest.raises(ValueError, match="holdout generator needs"):
        load_spec(path, tmp_path / "out", {"data": {"generator": "holdout", "options": {"name": "x"}}})


def test_a_yaml_spec_reads_like_its_toml_twin(tmp_path):
    import yaml

    from phds.experiment import read_spec_file

    toml_data = read_spec_file(write_spec(tmp_path))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(toml_data))
    assert load_spec(tmp_path / "spec.yaml", tmp_path / "o") == load_spec(tmp_path / "spec.toml", tmp_path / "o")


def test_the_shipped_specs_are_valid(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    small_real = load_spec(root / "recipes" / "small-real" / "spec.toml", tmp_path)
    assert small_real.margin_of("ppl") > 0 and len(small_real.seeds) >= 3
    assert {arm.kind for arm in small_real.arms} == {"phds", "oracle", "sft-dialled", "base-dialled"}
    assert small_real.data.train == str(tmp_path / "data" / "shakespeare_train.txt")


@pytest.mark.slow
def test_the_small_real_spec_runs_on_the_shared_data(shared_data, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("PHDS_DATA", str(shared_data))
    root = Path(__file__).resolve().parents[2]
    quick = {
        "seeds": [0, 1],
        "ks": [2, 4],
        "arms": [{"kind": "phds"}, {"kind": "sft-dialled"}],
        "base": {"pretrain": {"steps": 2}},
        "training": {"max_steps": 2, "eval_steps": 2, "save_steps": 2},
        "evaluation": {"limit": 2},
    }
    spec = load_spec(root / "recipes" / "small-real" / "spec.toml", tmp_path, quick)
    result = run_experiment(spec, tmp_path, say=lambda _: None)
    assert set(result.results["tasks"]) == {"shakespeare", "wikitext2_test"}
    assert result.results["tasks"]["shakespeare"]["metric"] == "ppl"
    assert all(c["verdict"] for c in result.results["tasks"]["shakespeare"]["comparisons"])


def test_a_failed_invocation_still_counts_in_the_compute_time(tmp_path, monkeypatch):
    import phds.experiment.run as run_module

    def fail_after_some_work(*args, **kwargs):
        raise RuntimeError("a job failed")

    monkeypatch.setattr(run_module, "_train_and_evaluate", fail_after_some_work)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="a job failed"):
        run_experiment(load_spec(write_spec(tmp_path), out), out, say=lambda _: None, command="first")
    timing = json.loads((out / "timing.json").read_text())
    assert [entry["command"] for entry in timing["invocations"]] == ["first"]
    assert timing["invocations"][0]["failed"] is True and timing["invocations"][0]["minutes"] >= 0
