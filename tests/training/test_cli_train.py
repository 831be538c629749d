"""`phds train` through typer's CliRunner: a PHDS run, an oracle, and bad input that fails before writing."""

from __future__ import annotations

import json

import pytest
import transformers
from typer.testing import CliRunner

import phds
from phds.cli import app
from tests.training.conftest import ADDITION

runner = CliRunner()
FAST = [
    "--max-steps",
    "2",
    "--batch-size",
    "4",
    "--max-length",
    "24",
    "--eval-steps",
    "2",
    "--save-steps",
    "2",
    "--eval-fraction",
    "0.125",
    "--report-to",
    "none",
    "--lr",
    "1e-3",
    "--logging-steps",
    "1",
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["completion"]}) + "\n" for r in ADDITION))
    return path


def test_phds_train_runs_phds_and_saves_a_loadable_checkpoint(tmp_path, data_file):
    out = tmp_path / "out"
    args = [
        "train",
        "tiny:olmoe",
        "--data",
        str(data_file),
        "--k",
        "2-4",
        "--anchor-k",
        "2",
        "--out",
        str(out),
        "--prompt-column",
        "question",
        "--completion-column",
        "answer",
        *FAST,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "saved" in result.output
    sidecar = phds.read_sidecar(out)
    assert sidecar.method == "phds" and sidecar.ks == [2, 3, 4] and sidecar.anchor_k == 2
    assert set(sidecar.validation_loss) == {"2", "3", "4"}
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_experts_per_tok == 4
    assert (out / "checkpoints" / "checkpoint-2").is_dir()


def test_phds_train_fixed_k_runs_an_oracle(tmp_path, data_file):
    out = tmp_path / "oracle"
    args = [
        "train",
        "tiny:mixtral",
        "--data",
        str(data_file),
        "--fixed-k",
        "2",
        "--out",
        str(out),
        "--prompt-column",
        "question",
        "--completion-column",
        "answer",
        "--eval-data",
        str(data_file),
        *FAST,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    sidecar = phds.read_sidecar(out)
    assert sidecar.method == "oracle" and sidecar.ks == [2]
    assert sidecar.made_by["data"]["eval"] == str(data_file) and sidecar.made_by["data"]["eval_rows"] == 64


@pytest.mark.slow
def test_phds_train_k_sampling_layer_trains_a_k_per_layer_and_says_so_in_the_sidecar(tmp_path, data_file):
    out = tmp_path / "layer"
    columns = ["--prompt-column", "question", "--completion-column", "answer"]
    args = ["train", "tiny:olmoe", "--data", str(data_file), "--k", "1-4", "--k-sampling", "layer", "--out", str(out)]
    result = runner.invoke(app, [*args, *columns, *FAST])
    assert result.exit_code == 0, result.output
    made_by = phds.read_sidecar(out).made_by
    assert made_by["k_sampling"] == "layer" and made_by["schedule"]["sampling"] == "layer"
    steps = [e for e in phds.training.read_log(out) if e["event"] == "step"]
    assert len(steps) == 2 and all(set(e["layer_k"]) == {"0", "1"} for e in steps)


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("k_above_experts", "between 1 and"),
        ("anchor_not_declared", "anchor_k"),
        ("missing_file", "not found"),
        ("empty_file", "empty"),
        ("wrong_columns", "needs a `text` column"),
        ("dense_model", "no MoE layers"),
        ("bad_k_list", "--k"),
        ("bad_select_by", "select_by"),
        ("bad_k_sampling", "`k_sampling` must be one of ['global', 'layer'], got k_sampling='token'"),
        ("layer_sampling_oracle", "`k_sampling`='layer' has no meaning for a fixed-k oracle"),
        ("bad_eval_k_list", "--eval-k"),
        ("eval_k_above_experts", "eval_ks"),
        ("zero_steps", "max_steps"),
        ("negative_lr", "learning_rate"),
        ("nan_lr", "learning_rate"),
        ("zero_batch", "per_device_train_batch_size"),
        ("missing_model_dir", "no such directory"),
        ("null_completion", ":2: field `answer`"),
    ],
)
def test_bad_input_fails_before_training_and_writes_nothing(tmp_path, data_file, case, message):
    out = tmp_path / "never"
    model, data, extra = "tiny:olmoe", str(data_file), ["--prompt-column", "question", "--completion-column", "answer"]
    k = ["--k", "2,3,4"]
    if case == "k_above_experts":
        k = ["--k", "2,9"]
    elif case == "anchor_not_declared":
        k = ["--k", "2,3,4", "--anchor-k", "1"]
    elif case == "missing_file":
        data = str(tmp_path / "nope.jsonl")
    elif case == "empty_file":
        data = str(_write(tmp_path / "empty.jsonl", []))
    elif case == "wrong_columns":
        extra = []
    elif case == "dense_model":
        dense = transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(
                vocab_size=128,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
            )
        )
        dense.save_pretrained(tmp_path / "dense")
        phds.tiny_tokenizer().save_pretrained(tmp_path / "dense")
        model = str(tmp_path / "dense")
    elif case == "bad_k_list":
        k = ["--k", "two"]
    elif case == "bad_select_by":
        extra = [*extra, "--select-by", "median"]
    elif case == "bad_k_sampling":
        extra = [*extra, "--k-sampling", "token"]
    elif case == "layer_sampling_oracle":
        k = ["--fixed-k", "2", "--k-sampling", "layer"]
    elif case == "bad_eval_k_list":
        extra = [*extra, "--eval-k", "two"]
    elif case == "eval_k_above_experts":
        extra = [*extra, "--eval-k", "2,99"]
    elif case == "missing_model_dir":
        model = str(tmp_path / "no-model-here")
    elif case == "null_completion":
        data = str(
            _write(tmp_path / "null.jsonl", [{"question": "q", "answer": "a"}, {"question": "q", "answer": None}])
        )
    # options given after FAST override it (the last occurrence wins)
    late = {
        "zero_steps": ["--max-steps", "0"],
        "negative_lr": ["--lr", "-1"],
        "nan_lr": ["--lr", "nan"],
        "zero_batch": ["--batch-size", "0"],
    }.get(case, [])
    result = runner.invoke(app, ["train", model, "--data", data, "--out", str(out), *k, *extra, *FAST, *late])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error:"), result.output  # one line
    assert "Traceback" not in result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_an_out_path_that_is_a_file_is_one_line_and_is_left_alone(tmp_path, data_file):
    out = tmp_path / "taken"
    out.write_text("keep me")
    args = ["train", "tiny:olmoe", "--data", str(data_file), "--out", str(out), "--k", "2,3,4", *FAST]
    result = runner.invoke(app, [*args, "--prompt-column", "question", "--completion-column", "answer"])
    assert result.exit_code == 2, result.output
    assert "is a file" in result.output and out.read_text() == "keep me"


def test_phds_train_help_documents_every_option_with_its_default():
    result = runner.invoke(app, ["train", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for option in (
        "--data",
        "--k",
        "--anchor-k",
        "--fixed-k",
        "--k-sampling",
        "--out",
        "--lora",
        "--resume",
        "--epsilon",
        "--aux-loss-coef",
        "--select-by",
        "--eval-data",
        "--packing",
    ):
        assert option in text
    assert "[default: 0.06]" in text and "[default: k_pre]" in text
