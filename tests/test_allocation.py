"""`phds.allocation`: the greedy per-layer budget, its file, and `phds allocate`.

The model's cheapest layer is known by construction: layer 1's routed experts have a zero down projection, so its
MoE output is 0 at every k and cutting it costs nothing, while the calibration rows are sampled from the model
itself at k_pre, so (in expectation) every cut of another layer raises their NLL.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import phds
from phds.allocation import Allocation, allocate, load_allocation, save_allocation
from phds.calibration_data import calibration_batches, calibration_loss
from phds.cli import app
from tests.conftest import sharpened

FREE_LAYER = 1


@pytest.fixture(scope="module")
def model():
    model = sharpened(phds.tiny_model("olmoe", num_hidden_layers=3, vocab_size=100, seed=0))
    with torch.no_grad():
        phds.moe_layers(model)[FREE_LAYER].experts.down_proj.zero_()
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return phds.tiny_tokenizer()


@pytest.fixture(scope="module")
def rows(model, tokenizer) -> list[dict]:
    """8 rows of 24 characters sampled from the model at k_pre (ids 4..99: printable characters, no specials)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.ones(8, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(24):
            probs = model(ids).logits[:, -1, 4:].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator) + 4], dim=1)
    return [{"text": tokenizer.decode(row[1:])} for row in ids]


@pytest.fixture(scope="module")
def allocation(model, tokenizer, rows) -> Allocation:
    return allocate(model, 2, rows, tokenizer=tokenizer, progress=False)


def test_the_free_layer_is_cut_first_and_all_the_way_down_before_any_other(allocation):
    cut_layers = [layer for layer, _, _ in allocation.trace]
    assert cut_layers[:3] == [FREE_LAYER] * 3  # 4 -> 1
    assert allocation.ks[FREE_LAYER] == 1
    assert FREE_LAYER not in cut_layers[3:]
    # A free cut leaves the loss exactly where it was.
    assert [loss for _, _, loss in allocation.trace[:3]] == [allocation.loss_start] * 3


def test_the_mean_k_reaches_the_budget_and_the_trace_accounts_for_every_cut(allocation):
    assert allocation.mean_k == 2.0 == sum(allocation.ks.values()) / 3
    assert len(allocation.trace) == 3 * 4 - 3 * 2
    assert allocation.loss_end == allocation.trace[-1][2]
    assert allocation.loss_end > allocation.loss_start  # the later cuts cost something


def test_each_step_keeps_the_cheapest_cut(model, tokenizer, rows, allocation):
    batches = calibration_batches(tokenizer, rows, max_length=1024, batch_size=8, device="cpu")

    ks = {index: 4 for index in allocation.ks}
    for layer, k, loss in allocation.trace:
        candidates = {}
        for index in ks:
            if ks[index] > 1:
                with phds.sparsity(model, {**ks, index: ks[index] - 1}):
                    candidates[index] = calibration_loss(model, batches)
        assert candidates[layer] == pytest.approx(loss) == pytest.approx(min(candidates.values()))
        ks[layer] = k


def test_the_model_is_left_at_the_k_it_had(model, tokenizer, rows):
    phds.set_k(model, 3)
    try:
        allocate(model, 3.5, rows, tokenizer=tokenizer, progress=False)
        assert phds.get_k(model) == 3
    finally:
        phds.set_k(model, 4)


def test_a_fractional_budget_stops_at_the_first_mean_at_or_below_it(model, tokenizer, rows):
    result = allocate(model, 3.5, rows, tokenizer=tokenizer, progress=False)
    assert sum(result.ks.values()) == 10  # 12 -> 10: mean 3.33 <= 3.5 < 11 / 3
    assert result.ks[FREE_LAYER] == 2


def test_min_k_and_start_bound_every_layer(model, tokenizer, rows):
    result = allocate(model, 2.5, rows, tokenizer=tokenizer, start=3, min_k=2, progress=False)
    assert set(result.ks.values()) <= {2, 3} and sum(result.ks.values()) == 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(budget=0.5), "`budget` must be a mean k in \\[min_k, start\\] = \\[1, 4\\]"),
        (dict(budget=5), "`budget` must be a mean k in"),
        (dict(budget=1.5, min_k=2), "`budget` must be a mean k in \\[min_k, start\\] = \\[2, 4\\]"),
        (dict(start=9), "`start` must be an integer in \\[1, 8\\]"),
        (dict(data=[]), "`data` is empty"),
        (dict(data=[{"question": "x"}]), "`data` needs a `text` column"),
        (dict(batch_size=0), "`batch_size` must be an integer"),
        (dict(tokenizer=None), "`tokenizer` is required"),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_argument(model, tokenizer, rows, kwargs, message):
    arguments = dict(budget=2, data=rows, tokenizer=tokenizer, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        allocate(model, arguments.pop("budget"), arguments.pop("data"), **arguments)


def test_a_dense_model_is_refused(tokenizer, rows):
    dense = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(phds.NotAnMoEError):
        allocate(dense, 2, rows, tokenizer=tokenizer, progress=False)


def test_prompt_completion_rows_score_the_completion_only(tokenizer):
    row = {"prompt": "ab", "completion": "cd"}
    ((ids_BS, mask_BS, labels_BS),) = calibration_batches(tokenizer, [row], max_length=64, batch_size=1, device="cpu")
    assert ids_BS[0].tolist() == tokenizer("abcd</s>").input_ids
    assert labels_BS[0].tolist() == [-100, -100, *tokenizer("cd</s>").input_ids]
    assert mask_BS.all()


# ----------------------------------------------------------------------------- the file


def test_the_saved_file_round_trips(allocation, tmp_path):
    path = save_allocation(allocation, tmp_path / "sub" / "alloc.json")
    assert load_allocation(path) == allocation.ks
    body = json.loads(path.read_text())
    assert body["mean_k"] == 2.0 and len(body["trace"]) == 6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"ks": {"0": 2}}', "is not a phds allocation file"),
        ('{"format": "phds-allocation", "version": 7, "ks": {"0": 2}}', "has version 7"),
        ('{"format": "phds-allocation", "version": 1, "ks": {}}', "must map layer indices to ks"),
        ('{"format": "phds-allocation", "version": 1, "ks": {"zero": 2}}', "layer 'zero' is not a layer index"),
        ('{"format": "phds-allocation", "version": 1, "ks": {"0": 0}}', "layer 0's k must be an integer >= 1"),
        ('{"format": "phds-allocation", "version": 1, "ks": {"0": 2.5}}', "layer 0's k must be an integer >= 1"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_fix(tmp_path, text, message):
    path = tmp_path / "alloc.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_allocation(path)
    assert str(path) in str(error.value)
    if "must map" not in message and "layer" not in message:
        assert "phds allocate" in str(error.value)


def test_a_missing_file_is_a_file_not_found_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="alloc.json.*phds allocate"):
        load_allocation(tmp_path / "alloc.json")


# ----------------------------------------------------------------------------- the command


def test_phds_allocate_writes_the_file_and_prints_the_ks_and_losses(tmp_path, rows):
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    out = tmp_path / "alloc.json"
    result = CliRunner().invoke(
        app,
        ["allocate", "tiny:olmoe", "--budget", "3", "--data", str(data), "--out", str(out), "--no-progress"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    ks = load_allocation(out)
    assert sorted(ks) == [0, 1] and sum(ks.values()) == 6
    assert "layer:k" in result.output and "calibration loss" in result.output


def test_phds_allocate_refuses_a_budget_above_the_start_in_one_line(tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "hello"}\n')
    result = CliRunner().invoke(
        app, ["allocate", "tiny:olmoe", "--budget", "9", "--data", str(data), "--out", str(tmp_path / "a.json")]
    )
    assert result.exit_code == 2
    assert "`budget` must be a mean k" in result.output
    assert not (tmp_path / "a.json").exists()
