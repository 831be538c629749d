"""Evaluation tasks: find a task file, detect its format from its fields, validate every line before any model work.

Formats (the ones of `../shared/data/eval` plus two of our own):

| kind          | fields                                          | scored by                                        |
|---------------|-------------------------------------------------|--------------------------------------------------|
| `mc`          | `{query, choices, gold}`                        | log-likelihood of `" " + choice` after the query |
| `winogrande`  | `{context_options, continuation, gold}`         | log-likelihood of the continuation per context   |
| `lambada`     | `{context, continuation}`                       | greedy exact match + log-likelihood              |
| `gsm8k`       | `{context, chain_of_thought, answer}`           | greedy generation, last number vs `answer`       |
| `exact_match` | `{prompt, answer}`                              | greedy generation up to a newline == answer      |
| `perplexity`  | a `.txt` file                                   | sliding-window perplexity                        |
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phds.textfiles import read_utf8

DATA_ENV = "PHDS_DATA"

# kind -> (required fields, field types). Detection picks the kind whose required fields are all present.
FORMATS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "mc": {"query": str, "choices": list, "gold": int},
    "winogrande": {"context_options": list, "continuation": str, "gold": int},
    "gsm8k": {"context": str, "chain_of_thought": str, "answer": (str, int, float)},
    "lambada": {"context": str, "continuation": str},
    "exact_match": {"prompt": str, "answer": (str, int, float)},
}
GENERATION_KINDS = ("gsm8k", "exact_match")


@dataclass(kw_only=True)
class Task:
    """One validated evaluation task.

    Attributes:
        name: the file stem (`arc_easy`), used as the key in results.
        kind: one of `FORMATS` or "perplexity".
        path: the file it was read from.
        items: the parsed jsonl objects (for "perplexity": a single `{"text": ...}` item).
        line_numbers: 1-based line of each item in the file (for auditing predictions).
    """

    name: str
    kind: str
    path: Path
    items: list[dict[str, Any]]
    line_numbers: list[int] = field(default_factory=list)

    def digest(self) -> str:
        """A short hash of the items, so `compare` knows two results were scored on the same items.

        Example: `task.digest()[:8]`.
        """
        text = json.dumps(self.items, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_dir() -> Path | None:
    """`$PHDS_DATA`, else `/work/shared/data` or `../shared/data` when they exist, else None.

    Example: `phds.evaluation.tasks.data_dir()`.
    """
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    for candidate in (Path("../shared/data"), Path("/work/shared/data")):
        if candidate.is_dir():
            return candidate
    return None


def resolve(spec: str | os.PathLike) -> Path:
    """A task spec (a .jsonl/.txt path or a bare name) -> the file it names.

    Bare names are looked up as `$PHDS_DATA/eval/<name>.jsonl`, then `$PHDS_DATA/text/<name>.txt`.

    Example: `resolve("arc_easy")`.
    """
    text = str(spec)
    path = Path(text)
    if path.suffix in (".jsonl", ".txt") or os.sep in text or "/" in text:
        if not path.is_file():
            raise ValueError(f"`tasks` entry {text!r}: no such file")
        if path.suffix not in (".jsonl", ".txt"):
            raise ValueError(f"`tasks` entry {text!r}: expected a .jsonl or .txt file")
        return path
    root = data_dir()
    if root is None:
        raise ValueError(
            f"`tasks` entry {text!r} is a bare name but ${DATA_ENV} is not set and no shared data "
            "folder was found; pass a .jsonl/.txt path or set PHDS_DATA"
        )
    candidates = [root / "eval" / f"{text}.jsonl", root / "text" / f"{text}.txt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(
        p.stem for sub in ("eval", "text") for p in (root / sub).glob("*.*") if p.suffix in (".jsonl", ".txt")
    )
    raise ValueError(f"unknown task {text!r}: not found as {[str(c) for c in candidates]}; known names: {known}")


def _detect(item: dict, where: str) -> str:
    for kind, fields in FORMATS.items():
        if all(name in item for name in fields):
            return kind
    raise ValueError(
        f"{where}: fields {sorted(item)} match no known format; expected one of "
        + "; ".join(f"{kind}: {sorted(fields)}" for kind, fields in FORMATS.items())
    )


def _check(item: dict, kind: str, where: str) -> None:
    for name, types in FORMATS[kind].items():
        value = item[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"{where}: field {name!r} must be {types}, got {value!r}")
    options = item.get("choices", item.get("context_options"))
    if options is not None:
        if len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise ValueError(f"{where}: needs a list of at least 2 strings, got {options!r}")
        if not 0 <= item["gold"] < len(options):
            raise ValueError(f"{where}: gold index {item['gold']} out of range for {len(options)} options")


def load_task(spec: str | os.PathLike) -> Task:
    """Read and validate one task; malformed lines are reported with their line number.

    Example: `load_task("/work/shared/data/eval/copa.jsonl").kind == "mc"`.
    """
    path = resolve(spec)
    name = path.stem
    if path.suffix == ".txt":
        text = read_utf8(path)
        if not text.strip():
            raise ValueError(f"{path}: empty text file")
        return Task(name=name, kind="perplexity", path=path, items=[{"text": text}], line_numbers=[1])
    items, lines, kind = [], [], None
    for number, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
        line_kind = _detect(item, where)
        if kind is None:
            kind = line_kind
        elif line_kind != kind:
            raise ValueError(f"{where}: format {line_kind!r} differs from the file's first item ({kind!r})")
        _check(item, kind, where)
        items.append(item)
        lines.append(number)
    if not items:
        raise ValueError(f"{path}: no items")
    return Task(name=name, kind=kind, path=path, items=items, line_numbers=lines)


def load_tasks(specs: list[str | os.PathLike] | str) -> list[Task]:
    """Validate every task spec (see `load_task`); duplicate names are an error.

    Example: `load_tasks(["copa", "tinyshakespeare"])`.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        raise ValueError("`tasks` must name at least one task, got []")
    tasks = [load_task(spec) for spec in specs]
    names = [task.name for task in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"`tasks` has duplicate task names {duplicates}")
    return tasks


def gold_number(answer: str | int | float) -> str:
    """GSM8K's gold answer: the number after '####' when present, else the whole answer, normalised.

    Example: `gold_number("so 3 + 4 = 7\\n#### 7") == "7"`.
    """
    text = str(answer)
    if "####" in text:
        text = text.split("####")[-1]
    return normalise_number(text.strip())


def normalise_number(text: str) -> str:
    """'1,000.00' -> '1000', '$5' -> '5'; leaves non-numbers stripped.

    Example: `normalise_number("1,234.50") == "1234.5"`.
    """
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned
    return str(int(value)) if value == int(value) else repr(value)


def few_shot_indices(n_items: int, index: int, num_fewshot: int, seed: int) -> list[int]:
    """Indices of the few-shot examples for item `index`: a fixed-seed sample of the other items.

    Example: `few_shot_indices(100, 3, 2, seed=0)`.
    """
    if num_fewshot <= 0:
        return []
    others = [i for i in range(n_items) if i != index]
    return random.Random(seed * 1_000_003 + index).sample(others, min(num_fewshot, len(others)))
