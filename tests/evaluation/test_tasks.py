from __future__ import annotations

import json

import pytest

from phds.evaluation.prompts import build_requests
from phds.evaluation.tasks import few_shot_indices, gold_number, load_task, load_tasks

from .conftest import MC, write_jsonl


@pytest.mark.parametrize(
    "name, kind",
    [("mc", "mc"), ("wino", "winogrande"), ("lamb", "lambada"), ("gsm", "gsm8k"), ("simple", "exact_match")],
)
def test_format_is_detected_from_the_fields(task_dir, name, kind):
    task = load_task(task_dir / f"{name}.jsonl")
    assert task.kind == kind and task.name == name and task.line_numbers[0] == 1


def test_text_file_is_a_perplexity_task(task_dir):
    assert load_task(task_dir / "text.txt").kind == "perplexity"


def test_malformed_line_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MC[0]) + "\n\n" + '{"query": "x", "choices": [\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        load_task(path)


def test_gold_index_out_of_range_is_an_error_naming_the_line(tmp_path):
    path = write_jsonl(tmp_path / "gold.jsonl", [MC[0], {"query": "q", "choices": ["a", "b"], "gold": 2}])
    with pytest.raises(ValueError, match=r"gold.jsonl:2: gold index 2 out of range for 2 options"):
        load_task(path)


def test_unknown_fields_and_mixed_formats_are_errors(tmp_path):
    with pytest.raises(ValueError, match="match no known format"):
        load_task(write_jsonl(tmp_path / "x.jsonl", [{"question": "q"}]))
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: format 'exact_match' differs"):
        load_task(write_jsonl(tmp_path / "mixed.jsonl", [MC[0], {"prompt": "a", "answer": "b"}]))


def test_missing_file_and_unknown_name_are_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such file"):
        load_task(tmp_path / "absent.jsonl")
    (tmp_path / "eval").mkdir()
    write_jsonl(tmp_path / "eval" / "known.jsonl", MC)
    monkeypatch.setenv("PHDS_DATA", str(tmp_path))
    assert load_task("known").kind == "mc"
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*known names: \['known'\]"):
        load_task("nope")
    with pytest.raises(ValueError, match="duplicate task names"):
        load_tasks(["known", str(tmp_path / "eval" / "known.jsonl")])


def test_few_shot_examples_are_fixed_by_the_seed_and_exclude_the_item(task_dir):
    assert few_shot_indices(5, 2, 3, seed=1) == few_shot_indices(5, 2, 3, seed=1)
    assert 2 not in few_shot_indices(5, 2, 4, seed=1)
    requests = build_requests(load_task(task_dir / "mc.jsonl"), 2, num_fewshot=1, seed=0)
    context, continuation = requests[0].pairs[0]
    shot = few_shot_indices(5, 0, 1, seed=0)[0]
    assert context == f"{MC[shot]['query']} {MC[shot]['choices'][MC[shot]['gold']]}\n\n{MC[0]['query']}"
    assert continuation == " 2"


def test_gsm8k_gold_is_the_number_after_the_hashes():
    assert gold_number("she has 3 + 4 = 7 eggs\n#### 1,007") == "1007"
    assert gold_number(18) == "18"


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_invalid_utf8_in_a_task_file_names_its_line(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    good = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}).encode()
    path.write_bytes(good + b"\n" + good.replace(b'"q"', b'"\xe9"') + b"\n")
    with pytest.raises(ValueError, match=rf"bad\{suffix}:2: invalid UTF-8"):
        load_task(path)
