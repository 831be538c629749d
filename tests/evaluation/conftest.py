"""Fixtures of the evaluation tests: one tiny OLMoE + char tokenizer, and small task files of every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import phds

MC = [
    {"query": "Q: 1+1?", "choices": ["2", "three"], "gold": 0},
    {"query": "Q: sky?", "choices": ["blue", "green", "red"], "gold": 0},
    {"query": "Q: cat", "choices": ["meow", "woof"], "gold": 0},
    {"query": "Q: up", "choices": ["down", "left"], "gold": 0},
    {"query": "Hi", "choices": ["there", "you all", "x"], "gold": 2},
]
WINOGRANDE = [
    {"context_options": ["Ann met Bo so Ann", "Ann met Bo so Bo"], "continuation": "was glad.", "gold": 0},
    {"context_options": ["It fit, the box", "It fit, the bag"], "continuation": "was big.", "gold": 1},
]
LAMBADA = [{"context": "the cat sat on the", "continuation": "mat"}, {"context": "a b c", "continuation": "d"}]
GSM8K = [
    {"context": "2 plus 3?", "chain_of_thought": "2+3=5", "answer": "5"},
    {"context": "1 plus 1?", "chain_of_thought": "1+1=2", "answer": "2"},
]
SIMPLE = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}, {"prompt": "ab", "answer": "c"}]
TEXT = "To be, or not to be, that is the question. " * 6


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): tiny OLMoE, 8 experts, k_pre 4."""
    return phds.tiny_model("olmoe"), phds.tiny_tokenizer()


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    write_jsonl(root / "mc.jsonl", MC)
    write_jsonl(root / "wino.jsonl", WINOGRANDE)
    write_jsonl(root / "lamb.jsonl", LAMBADA)
    write_jsonl(root / "gsm.jsonl", GSM8K)
    write_jsonl(root / "simple.jsonl", SIMPLE)
    (root / "text.txt").write_text(TEXT)
    return root
