from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from phds.cli import app

runner = CliRunner()


def test_phds_eval_writes_the_report_and_prints_a_table(task_dir, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "eval",
            "tiny:olmoe",
            "--k",
            "1,4",
            "--tasks",
            f"{task_dir}/mc.jsonl,{task_dir}/text.txt",
            "--out",
            str(out),
            "--no-latency",
            "--device",
            "cpu",
            "--max-length",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "acc_norm" in result.output and "ppl" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["ks"] == [1, 4] and results["model"] == "tiny:olmoe" and not results["latency"]
    assert {"report.md", "frontier.png", "agreement.png", "predictions.jsonl"} <= {p.name for p in out.iterdir()}


def test_phds_sweep_and_compare_run_from_the_command_line(task_dir, tmp_path):
    result = runner.invoke(
        app,
        [
            "sweep",
            "tiny:olmoe",
            "--k",
            "2-4",
            "--tasks",
            f"{task_dir}/mc.jsonl",
            "--out",
            str(tmp_path / "sweep"),
            "--no-latency",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "verdict:" in result.output
    result = runner.invoke(
        app, ["compare", str(tmp_path / "sweep"), str(tmp_path / "sweep"), "--out", str(tmp_path / "cmp")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "compare.md").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "1,9", "--tasks", "{d}/mc.jsonl"], "number of experts (8), got ks=[1, 9]"),
        (["--k", "1", "--tasks", "{d}/absent.jsonl"], "no such file"),
        (["--k", "x", "--tasks", "{d}/mc.jsonl"], "--k must be integers"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(task_dir, tmp_path, args, message):
    args = [a.format(d=task_dir) for a in args]
    result = runner.invoke(app, ["eval", "tiny:olmoe", *args, "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()
