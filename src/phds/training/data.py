"""Training data: read rows from a file, a `datasets` name or memory, check them, hold out a validation split.

Three row shapes are accepted, the ones TRL's `SFTTrainer` formats itself:
- language modelling: a `text` column (plain text; `.txt` files give one row per non-empty line);
- prompt/completion: `prompt` and `completion` columns (loss on the completion only);
- chat: a `messages` column of `{"role", "content"}` turns (formatted with the tokenizer's chat template).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import datasets

from phds.textfiles import read_utf8

logger = logging.getLogger(__name__)

DataSource = str | os.PathLike | datasets.Dataset | Sequence[Mapping]

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _looks_like_path(source: str) -> bool:
    """A file-ish string (known suffix, explicit directory, nested path) rather than an `owner/name` hub id."""
    return Path(source).suffix.lower() in FILE_BUILDERS or source.startswith((".", "/", "~")) or source.count("/") > 1


def _check_text_file(path: Path, builder: str, what: str) -> list[int] | None:
    """Check a text-format file before `datasets` reads it; the 1-based line of each row, for a JSON-lines file.

    Every problem is reported as `path:line` (1-based): invalid UTF-8 in any text file, and a line that is not a
    JSON object in a JSON-lines file. A `.json` file holding one JSON document (a list of rows) has no line per row:
    None then, and rows are named by their 1-based number instead.
    """
    text = read_utf8(path, what)
    if builder != "json":
        return None
    if path.suffix.lower() == ".json" and text.lstrip().startswith(("[", "{\n", "{\r")):
        try:
            json.loads(text)
            return None  # one JSON document
        except json.JSONDecodeError as error:
            if text.lstrip().startswith("["):
                raise ValueError(f"`{what}` {path}:{error.lineno}: invalid JSON: {error.msg}") from None
    lines = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"`{what}` {path}:{number}: invalid JSON ({error.msg}, column {error.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"`{what}` {path}:{number}: each line must be a JSON object, got {type(row).__name__}")
        lines.append(number)
    return lines


def _read(source: DataSource, what: str, split: str) -> tuple[datasets.Dataset, Callable[[int], str]]:
    """`read_rows`, and a function naming row i (0-based) for error messages: `path:line` for JSON-lines files."""

    def by_number(index: int) -> str:
        return f"row {index + 1}"

    if isinstance(source, datasets.Dataset):
        return source, by_number
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"`{what}` must be a {'/'.join(sorted(FILE_BUILDERS))} file or a datasets name, got {text!r}"
                )
            if not path.read_bytes().strip():
                raise ValueError(f"`{what}` is empty: {text} has no rows")
            lines = _check_text_file(path, builder, what) if builder != "parquet" else None
            try:
                rows = datasets.load_dataset(builder, data_files=str(path), split="train")
            except Exception as error:  # malformed JSON/parquet surface as many exception types
                raise ValueError(f"`{what}` could not be read as {builder}: {text}: {error}") from error
            if builder == "text":
                rows = rows.filter(lambda row: bool(row["text"].strip()))
            if lines is not None and len(lines) == len(rows):
                return rows, lambda index: f"{path}:{lines[index]}"
            return rows, lambda index: f"{path} row {index + 1}"
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split), by_number
        if _looks_like_path(text):
            raise FileNotFoundError(f"`{what}` file not found: {text}")
        try:
            return datasets.load_dataset(text, split=split), by_number
        except Exception as error:  # datasets raises many kinds (hub errors, missing splits, ...)
            raise ValueError(
                f"`{what}`={text!r} is neither a local file nor a loadable datasets name: {error}"
            ) from error
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        if not all(isinstance(row, Mapping) for row in source):
            raise ValueError(f"`{what}` as a list must hold dicts (rows), got {type(source[0]).__name__} items")
        return datasets.Dataset.from_list([dict(row) for row in source]), by_number
    raise ValueError(
        f"`{what}` must be a path, a datasets name, a datasets.Dataset or a list of dicts, got {type(source).__name__}"
    )


def read_rows(source: DataSource, *, what: str = "train_data", split: str = "train") -> datasets.Dataset:
    """Rows of a local jsonl/json/parquet/csv/txt file, a `datasets` hub name, a `Dataset` or a list of dicts.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unsupported file type, a source of the wrong kind, invalid UTF-8 or a line that is not a
            JSON object (named as `path:line`, 1-based).

    Example: `read_rows("data/train.jsonl")`.
    """
    return _read(source, what, split)[0]


def select_columns(
    rows: datasets.Dataset,
    *,
    what: str = "train_data",
    text_field: str = "text",
    prompt_column: str | None = None,
    completion_column: str | None = None,
    locate: Callable[[int], str] | None = None,
) -> datasets.Dataset:
    """Rename the user's columns to TRL's (`prompt`, `completion`), keep only the ones training reads, and check.

    Every row is checked; a bad one is named by `locate(index)` (default "row N", 1-based) and the field.

    Raises:
        ValueError: an empty dataset, one without `messages`, `prompt`+`completion` or the text column, or a row
            whose value there is missing, null or of the wrong type.

    Example: `select_columns(rows, prompt_column="question", completion_column="answer")`.
    """
    if len(rows) == 0:
        raise ValueError(f"`{what}` is empty: no rows to train or evaluate on")
    renames = {}
    for name, target in ((prompt_column, "prompt"), (completion_column, "completion")):
        if name is None or name == target:
            continue
        if name not in rows.column_names:
            raise ValueError(f"`{what}` has no column {name!r} (columns: {rows.column_names})")
        renames[name] = target
    if renames:
        rows = rows.remove_columns([c for c in renames.values() if c in rows.column_names]).rename_columns(renames)
    columns = set(rows.column_names)
    if "messages" in columns:
        keep = ["messages"]
    elif {"prompt", "completion"} <= columns:
        keep = ["prompt", "completion"]
    elif text_field in columns:
        keep = [text_field]
    else:
        raise ValueError(
            f"`{what}` needs a `{text_field}` column (language modelling), `prompt` and `completion` columns (SFT) or "
            f"a `messages` column (chat); it has {sorted(columns)}. Map yours with prompt_column/completion_column."
        )
    rows = rows.select_columns(keep)
    where = locate or (lambda index: f"row {index + 1}")
    named = {target: name for name, target in renames.items()}  # errors name the user's column
    for column in keep:
        for index, value in enumerate(rows[column]):
            if column == "messages":
                if not isinstance(value, list) or not value or not all(isinstance(m, Mapping) for m in value):
                    raise ValueError(
                        f"`{what}` {where(index)}: field `messages` must be a non-empty list of {{role, content}} "
                        f"dicts, got {value!r:.80}"
                    )
            elif not isinstance(value, str):
                got = "missing or null" if value is None else f"a {type(value).__name__}"
                raise ValueError(
                    f"`{what}` {where(index)}: field `{named.get(column, column)}` must be a string, got {got}"
                )
    return rows


def split_validation(
    rows: datasets.Dataset, *, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out `eval_fraction` of the rows (at least one, and at least one left to train on) for validation.

    Example: `train_rows, eval_rows = split_validation(rows, eval_fraction=0.05, seed=0)`.
    """
    if eval_fraction <= 0:
        return rows, None
    if len(rows) < 2:
        raise ValueError(
            f"`train_data` has {len(rows)} row: too few to hold out a validation split; pass `eval_data` or "
            "eval_fraction=0"
        )
    n_eval = min(max(1, round(eval_fraction * len(rows))), len(rows) - 1)
    parts = rows.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def prepare_data(
    train_data: DataSource,
    eval_data: DataSource | None,
    *,
    text_field: str = "text",
    prompt_column: str | None = None,
    completion_column: str | None = None,
    eval_fraction: float = 0.05,
    max_eval_samples: int | None = None,
    split: str = "train",
    seed: int = 0,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Read, check and split the training and validation rows; everything `train` needs, before any model work.

    Example: `train_rows, eval_rows = prepare_data("train.jsonl", None, eval_fraction=0.1)`.
    """
    columns = dict(text_field=text_field, prompt_column=prompt_column, completion_column=completion_column)
    rows, locate = _read(train_data, "train_data", split)
    train_rows = select_columns(rows, what="train_data", locate=locate, **columns)
    if eval_data is not None:
        rows, locate = _read(eval_data, "eval_data", split)
        eval_rows = select_columns(rows, what="eval_data", locate=locate, **columns)
    else:
        train_rows, eval_rows = split_validation(train_rows, eval_fraction=eval_fraction, seed=seed)
    if eval_rows is not None and max_eval_samples is not None and len(eval_rows) > max_eval_samples:
        eval_rows = eval_rows.select(range(max_eval_samples))
    logger.info("training rows: %d, validation rows: %d", len(train_rows), 0 if eval_rows is None else len(eval_rows))
    return train_rows, eval_rows
