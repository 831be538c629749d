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
        (["--k", "x", "--tasks", "{d}/mc.jsonl"], "--k: an operating point is a k like"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(task_dir, tmp_path, args, message):
    args = [a.format(d=task_dir) for a in args]
    result = runner.invoke(app, ["eval", "tiny:olmoe", *args, "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("command", "model", "device", "message"),
    [
        ("eval", "tiny:olmoe", "cpu", "is a file, not a directory"),
        ("sweep", "tiny:olmoe", "cpu", "is a file, not a directory"),
        ("eval", "./no/such/checkpoint", "cpu", "no such directory"),
        ("eval", "tiny:olmoe", "banana", "`device` must be"),
    ],
)
def test_an_unusable_out_model_or_device_is_refused_before_evaluating(
    task_dir, tmp_path, command, model, device, message
):
    out = tmp_path / "o"
    if "file" in message:
        out.write_text("keep me")
    args = [command, model, "--k", "1", "--tasks", f"{task_dir}/mc.jsonl", "--out", str(out), "--device", device]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error:") and message in result.output
    assert "Traceback" not in result.output
    assert out.read_text() == "keep me" if "file" in message else not out.exists()


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(task_dir, tmp_path, monkeypatch):
    import phds.evaluation

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory\nwith details")

    monkeypatch.setattr(phds.evaluation, "evaluate", broken)
    args = ["eval", "tiny:olmoe", "--k", "1", "--tasks", f"{task_dir}/mc.jsonl", "--out", str(tmp_path / "o")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: RuntimeError: CUDA out of memory with details (run `phds --debug ...` for the traceback)"
    )
    debug = runner.invoke(app, ["--debug", *args])
    assert isinstance(debug.exception, RuntimeError)
