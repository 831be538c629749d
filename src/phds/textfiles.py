"""Reading users' text files (training data, task files) as UTF-8, with a bad byte named as `path:line`."""

from __future__ import annotations

import os
from pathlib import Path


def read_utf8(path: str | os.PathLike, what: str | None = None) -> str:
    """The text of `path`; invalid UTF-8 is a ValueError naming `path:line` (1-based) and the byte.

    Example: `read_utf8("data/train.jsonl", "train_data")`.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        prefix = f"`{what}` " if what else ""
        raise ValueError(
            f"{prefix}{path}:{line}: invalid UTF-8 (byte {data[error.start]:#04x}); save the file as UTF-8"
        ) from None
