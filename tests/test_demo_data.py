"""The built-in demo corpus: seeded, balanced over skills, printable, correct, and evaluation disjoint from training."""

from __future__ import annotations

import re
from collections import Counter

import pytest

import phds
from phds.demo_data import SKILLS, DemoData, make_demo_data, split_of

SIZES = {"n_pretrain": 3000, "n_sft": 600, "n_valid": 120, "n_eval": 240}


@pytest.fixture(scope="module")
def data() -> DemoData:
    return make_demo_data(seed=0, **SIZES)


def _body_of_line(line: str) -> str:
    body, _, _ = line.partition("=")
    return body


def _body_of_prompt(prompt: str) -> str:
    assert prompt.startswith("Q:") and prompt.endswith("? A:"), prompt
    return prompt[len("Q:") : -len("? A:")]


def _solve(body: str) -> str:
    """An independent solver for every skill, to check the generator's answers."""
    marker, _, payload = body.partition(" ")
    if marker == "ADD":
        a, b = payload.split("+")
        return str(int(a) + int(b))
    if marker == "REV":
        return payload[::-1]
    if marker == "SRT":
        return "".join(sorted(payload))
    if marker == "KV":
        pairs, query = payload.split(";")
        return dict(pair.split(":") for pair in pairs.split(","))[query]
    if marker == "SEQ":
        terms = [int(t) for t in payload.split(",")]
        return str(terms[-1] + terms[1] - terms[0])
    if marker == "CPY":
        return payload
    raise AssertionError(f"unknown marker in {body!r}")


# One regular expression per skill for an answer of the right format (distractors must match it too).
ANSWER_FORMAT = {
    "add": r"\d{1,3}",
    "reverse": r"[a-z]{2,7}",
    "sort": r"[a-z]{2,7}",
    "recall": r"\d",
    "sequence": r"\d{1,3}",
    "copy": r"[a-z0-9]{2,8}",
}


def test_the_same_seed_gives_the_same_corpus_and_another_seed_a_different_one():
    first, again, other = (make_demo_data(seed=seed, **SIZES) for seed in (0, 0, 1))
    assert first == again
    for name in ("pretrain_text", "sft_train", "sft_valid", "eval_mc", "eval_em"):
        assert getattr(first, name) != getattr(other, name), name


def test_default_sizes_are_honoured():
    data = make_demo_data(seed=3)
    sizes = [len(data.pretrain_text), len(data.sft_train), len(data.sft_valid), len(data.eval_mc), len(data.eval_em)]
    assert sizes == [20000, 2000, 200, 300, 300]


def test_evaluation_items_never_appear_in_pretraining_or_sft(data):
    eval_bodies = {item["body"] for item in data.eval_em}
    assert eval_bodies == {item["body"] for item in data.eval_mc}
    assert not eval_bodies & {_body_of_line(line) for line in data.pretrain_text}
    assert not eval_bodies & {_body_of_prompt(row["prompt"]) for row in data.sft_train + data.sft_valid}
    # The same, checked on the raw text: no eval prompt is a training prompt or inside a pretraining line, and no
    # eval instance written the pretraining way ("ADD 12+7=") is inside a pretraining line either.
    sft_prompts = {row["prompt"] for row in data.sft_train + data.sft_valid}
    corpus = "\n" + "\n".join(data.pretrain_text) + "\n"
    for item in data.eval_em:
        assert item["prompt"] not in sft_prompts
        assert item["prompt"] not in corpus
        assert "\n" + item["body"] + "=" not in corpus


def test_evaluation_stays_disjoint_from_the_training_data_of_other_seeds(data):
    other = make_demo_data(seed=7, **SIZES)
    eval_bodies = {item["body"] for item in data.eval_em}
    assert not eval_bodies & {_body_of_line(line) for line in other.pretrain_text}
    assert not eval_bodies & {_body_of_prompt(row["prompt"]) for row in other.sft_train + other.sft_valid}


def test_pretraining_sft_and_validation_use_different_instances(data):
    pretrain = {_body_of_line(line) for line in data.pretrain_text}
    train = {_body_of_prompt(row["prompt"]) for row in data.sft_train}
    valid = {_body_of_prompt(row["prompt"]) for row in data.sft_valid}
    assert not pretrain & train and not pretrain & valid and not train & valid
    assert len(valid) == len(data.sft_valid)  # held-out items are distinct
    assert len({item["body"] for item in data.eval_em}) == len(data.eval_em)


def test_split_of_is_a_fixed_partition_of_the_instance_space():
    owners = Counter(split_of("copy", f"CPY {n:04d}") for n in range(10000))
    assert set(owners) == {"eval", "sft_valid", "sft_train", "pretrain"}
    # About 15% / 10% / 25% / 50% of 10,000 instances.
    assert 1300 < owners["eval"] < 1700 and 800 < owners["sft_valid"] < 1200
    assert 2200 < owners["sft_train"] < 2800 and 4600 < owners["pretrain"] < 5400
    # Pinned: changing the hash would reshuffle every split and silently change what the demo evaluates.
    pinned = {("add", "ADD 12+7"): "sft_valid", ("add", "ADD 2+2"): "eval", ("copy", "CPY abc"): "sft_train"}
    assert {key: split_of(*key) for key in pinned} == pinned


def test_pretraining_is_raw_text_and_sft_is_question_answer(data):
    for line in data.pretrain_text:
        assert not line.startswith("Q:") and line.count("=") == 1, line
    for row in data.sft_train + data.sft_valid:
        assert set(row) == {"prompt", "completion"}
        assert row["completion"] == " " + _solve(_body_of_prompt(row["prompt"]))  # " " = the scoring delimiter


def test_every_answer_is_correct(data):
    for line in data.pretrain_text:
        body, _, answer = line.partition("= ")
        assert _solve(body) == answer, line
    for item in data.eval_em:
        assert item["prompt"] == f"Q:{item['body']}? A:"
        assert _solve(item["body"]) == item["answer"]
    for item in data.eval_mc:
        assert item["choices"][item["gold"]] == _solve(_body_of_prompt(item["query"]))


def test_every_string_is_short_printable_ascii_the_tiny_tokenizer_knows(data):
    texts = list(data.pretrain_text)
    texts += [row["prompt"] + row["completion"] for row in data.sft_train + data.sft_valid]
    texts += [item["query"] + choice for item in data.eval_mc for choice in item["choices"]]
    texts += [item["prompt"] + item["answer"] for item in data.eval_em]
    allowed = {chr(c) for c in range(32, 127)}  # newline is allowed too, but no example needs one
    for text in texts:
        assert set(text) <= allowed and len(text) <= 48, text
    tokenizer = phds.tiny_tokenizer()
    ids = tokenizer("\n".join(texts[:: max(1, len(texts) // 500)]), add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids


def test_string_distractors_are_near_misses_with_the_answer_letters_in_another_order_or_one_replaced(data):
    for item in data.eval_mc:
        if item["skill"] in ("reverse", "sort", "copy"):
            gold = item["choices"][item["gold"]]
            for choice in item["choices"]:
                assert len(choice) == len(gold) and sum(a != b for a, b in zip(choice, gold, strict=True)) <= 2


def test_multiple_choice_items_have_four_distinct_choices_of_the_answer_format(data):
    for item in data.eval_mc:
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4, item
        assert isinstance(item["gold"], int) and 0 <= item["gold"] < 4
        assert all(re.fullmatch(ANSWER_FORMAT[item["skill"]], choice) for choice in choices), item


def test_gold_positions_are_balanced(data):
    counts = Counter(item["gold"] for item in data.eval_mc)
    assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) <= 1


def test_recall_distractors_are_other_values_from_the_context(data):
    for item in data.eval_mc:
        if item["skill"] == "recall":
            pairs = dict(pair.split(":") for pair in item["body"][len("KV ") :].split(";")[0].split(","))
            in_context = [choice for choice in item["choices"] if choice in pairs.values()]
            assert len(in_context) == len(pairs)  # the gold value and every other value seen in the prompt


def test_every_split_is_balanced_over_the_skills(data):
    for items in (data.eval_mc, data.eval_em):
        assert Counter(item["skill"] for item in items) == dict.fromkeys(SKILLS, SIZES["n_eval"] // len(SKILLS))
    markers = Counter(line.split(" ")[0] for line in data.pretrain_text)
    assert len(markers) == len(SKILLS) and max(markers.values()) - min(markers.values()) <= 1


def test_a_subset_of_skills_gives_only_those_skills():
    data = make_demo_data(seed=0, n_pretrain=50, n_sft=10, n_valid=4, n_eval=7, skills=("add", "copy"))
    assert {line.split(" ")[0] for line in data.pretrain_text} == {"ADD", "CPY"}
    assert Counter(item["skill"] for item in data.eval_em) == {"add": 4, "copy": 3}


def test_written_files_round_trip(tmp_path, data):
    paths = data.write(tmp_path / "demo")
    assert {path.name for path in paths.values()} == {
        "pretrain.txt",
        "sft_train.jsonl",
        "sft_valid.jsonl",
        "eval_mc.jsonl",
        "eval_em.jsonl",
    }
    assert paths["pretrain"].read_text().splitlines() == data.pretrain_text
    assert DemoData.read(tmp_path / "demo") == data


def test_reading_a_directory_without_the_files_raises(tmp_path):
    with pytest.raises(ValueError, match="in_dir"):
        DemoData.read(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"n_pretrain": -1}, "n_pretrain"),
        ({"n_sft": 2.5}, "n_sft"),
        ({"n_valid": -3}, "n_valid"),
        ({"n_eval": True}, "n_eval"),
        ({"seed": "0"}, "seed"),
        ({"skills": ()}, "skills"),
        ({"skills": ("add", "add")}, "skills"),
        ({"skills": ("add", "poetry")}, "skills"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_parameter(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        make_demo_data(**kwargs)


def test_asking_for_more_distinct_items_than_a_skill_holds_raises():
    # The add skill has 1,000 instances, about 150 of them reserved for evaluation and 100 for validation.
    with pytest.raises(ValueError, match="n_eval"):
        make_demo_data(n_pretrain=0, n_sft=0, n_valid=0, n_eval=300, skills=("add",))
    with pytest.raises(ValueError, match="n_valid"):
        make_demo_data(n_pretrain=0, n_sft=0, n_valid=200, n_eval=0, skills=("add",))


def test_tuning_items_come_from_the_validation_partition_never_the_evaluation_one():
    tuning = make_demo_data(seed=1000, n_pretrain=50, n_sft=50, n_valid=40, n_eval=40, eval_split="sft_valid")
    assert {split_of(item["skill"], item["body"]) for item in tuning.eval_mc} == {"sft_valid"}
    reported = make_demo_data(seed=1000, n_pretrain=50, n_sft=50, n_valid=40, n_eval=40)
    assert {split_of(item["skill"], item["body"]) for item in reported.eval_mc} == {"eval"}
    with pytest.raises(ValueError, match="`eval_split`"):
        make_demo_data(n_eval=4, eval_split="eval_mc")
