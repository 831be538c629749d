"""`phds info` and the CLI shell."""

from __future__ import annotations

from typer.testing import CliRunner

import phds
from phds.cli import app

runner = CliRunner()


def test_help_lists_info_and_explains_the_project():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.output and "top-k" in result.output


def test_info_prints_layout_and_active_parameters_per_k():
    result = runner.invoke(app, ["info", "tiny:qwen2_moe"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "k_pre: 4" in result.output
    assert "shared experts: 1 per layer" in result.output
    assert "active parameters per token" in result.output
    assert "4 (k_pre)" in result.output


def test_info_shows_the_declared_ks_of_a_phds_checkpoint(tmp_path):
    phds.save(phds.tiny_model("olmoe"), tmp_path / "ckpt", sidecar=phds.Sidecar(ks=[2, 3, 4], k_pre=4, anchor_k=2))
    result = runner.invoke(app, ["info", str(tmp_path / "ckpt")], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "declared ks: [2, 3, 4]" in result.output and "anchor k: 2" in result.output


def test_info_on_a_bad_model_exits_with_a_clear_error():
    result = runner.invoke(app, ["info", "tiny:nonexistent"])
    assert result.exit_code == 2
    assert "unknown tiny model" in result.output


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, monkeypatch):
    import pytest

    import phds.bench
    import phds.demo
    import phds.experiment

    for module, name in ((phds.bench, "bench"), (phds.demo, "run_demo"), (phds.experiment, "load_spec")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("started work"))
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for args, message in (
        (["bench", "--k", "1", "--json", str(tmp_path)], "is a directory"),
        (["bench", "--k", "1", "--json", str(taken / "bench.json")], "is a file"),
        (["demo", "--out", str(taken)], "is a file"),
        (["experiment", "spec.toml", "--out", str(taken)], "is a file"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error:") and message in result.output, result.output
    assert taken.read_text() == "keep me"


def test_a_malformed_k_list_is_one_line_like_every_other_error():
    result = runner.invoke(app, ["eval", "tiny:olmoe", "--k", "1,x", "--tasks", "t.jsonl", "--out", "o"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --k must be integers like '1,2,4' or '2-4', got '1,x'"
