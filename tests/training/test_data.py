"""Reading, checking and splitting training rows."""

from __future__ import annotations

import json

import datasets
import pytest

from phds.training.data import prepare_data, read_rows, select_columns, split_validation


def test_jsonl_parquet_txt_lists_and_datasets_all_read_as_rows(tmp_path):
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "a.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\nsecond line\n")
    assert read_rows(jsonl).to_list() == rows
    assert read_rows(parquet).to_list() == rows
    assert read_rows(rows).to_list() == rows
    assert read_rows(datasets.Dataset.from_list(rows)).to_list() == rows
    assert read_rows(txt)["text"] == ["first line", "second line"]  # blank lines dropped


def test_user_columns_map_to_prompt_and_completion_and_others_are_dropped():
    rows = datasets.Dataset.from_list([{"question": "q", "answer": "a", "id": 3}])
    mapped = select_columns(rows, prompt_column="question", completion_column="answer")
    assert mapped.column_names == ["prompt", "completion"]
    assert mapped[0] == {"prompt": "q", "completion": "a"}


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([], {}, "empty"),
        ([{"question": "q"}], {}, "needs a `text` column"),
        ([{"prompt": "q", "completion": "a"}], {"prompt_column": "missing"}, "no column 'missing'"),
        ([{"text": 3}], {}, r"row 1: field `text` must be a string, got a int"),
        ([{"messages": "hi"}], {}, "messages"),
    ],
)
def test_bad_rows_raise_a_value_error_naming_the_problem(rows, kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_columns(datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({}), **kwargs)


def test_a_missing_file_is_a_clear_error_not_a_hub_lookup(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="must be a"):
        read_rows(42)


def test_validation_is_held_out_from_training_rows_deterministically():
    rows = datasets.Dataset.from_list([{"text": str(i)} for i in range(40)])
    train_a, eval_a = split_validation(rows, eval_fraction=0.1, seed=0)
    train_b, eval_b = split_validation(rows, eval_fraction=0.1, seed=0)
    assert len(eval_a) == 4 and len(train_a) == 36
    assert eval_a["text"] == eval_b["text"]
    assert not set(eval_a["text"]) & set(train_a["text"])
    train_rows, eval_rows = prepare_data(rows, None, eval_fraction=0.5, max_eval_samples=3)
    assert len(eval_rows) == 3 and len(train_rows) == 20
    assert prepare_data(rows, None, eval_fraction=0.0)[1] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # a missing or null completion on the third row (line 4: a blank line is skipped, not counted as a row)
        (
            b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n{"prompt": "e"}\n',
            r"data.jsonl:4: field `completion` must be a string, got missing or null",
        ),
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": null}\n',
            r"data.jsonl:2: field `completion` must be a string, got missing or null",
        ),
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 7}\n',
            r"data.jsonl:2: field `completion` must be a string, got a int",
        ),
        # malformed JSON and non-objects: 1-based lines
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", \n', r"data.jsonl:2: invalid JSON"),
        (b'{"prompt": "a", "completion": "b"}\n[1, 2]\n', r"data.jsonl:2: each line must be a JSON object"),
        # invalid UTF-8, named by line too
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "d"}\n',
            r"data.jsonl:2: invalid UTF-8",
        ),
    ],
)
def test_every_data_error_names_the_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        prepare_data(str(path), None, eval_fraction=0)


def test_invalid_utf8_in_a_text_file_names_its_line(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(b"one\ntwo\nth\xc3ree\n")
    with pytest.raises(ValueError, match=r"data.txt:3: invalid UTF-8"):
        read_rows(path)


def test_rows_of_a_list_are_named_by_their_1_based_number():
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    with pytest.raises(ValueError, match=r"row 2: field `completion`"):
        prepare_data(rows, None, eval_fraction=0)


def test_a_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "a\u2028b", "completion": "c"}, {"prompt": "d", "completion": None}]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.jsonl:2: field `completion`"):
        prepare_data(str(path), None, eval_fraction=0)
