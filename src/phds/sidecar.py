"""`phds.json`: the small file beside a plain HF checkpoint that declares which ks it was made for."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SIDECAR_NAME = "phds.json"
FORMAT_VERSION = 1


@dataclass(kw_only=True)
class Sidecar:
    """What a PHDS checkpoint declares.

    Attributes:
        ks: the declared k set, ascending.
        k_pre: the pretrained `num_experts_per_tok` (unchanged in the checkpoint's config).
        default_k: the k a loader dials by default (must be in `ks`).
        method: "phds" for a checkpoint trained over `ks`, "oracle" for a fixed-k fine-tune, "base" otherwise.
        anchor_k: the curriculum's anchor k (PHDS only).
        made_by: free-form provenance: schedule, data, steps, seed, versions.
        validation_loss: per-k validation loss, keyed by k as a string (JSON keys are strings).
    """

    ks: list[int]
    k_pre: int
    default_k: int | None = None
    method: str = "phds"
    anchor_k: int | None = None
    made_by: dict[str, Any] = field(default_factory=dict)
    validation_loss: dict[str, float] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ValueError(f"`ks` must be a non-empty list of positive ints, got {self.ks!r}")
        self.ks = sorted(set(self.ks))
        if self.default_k is None:
            self.default_k = self.k_pre if self.k_pre in self.ks else max(self.ks)
        if self.default_k not in self.ks:
            raise ValueError(f"`default_k` must be one of the declared ks {self.ks}, got {self.default_k}")
        if self.anchor_k is not None and self.anchor_k not in self.ks:
            raise ValueError(f"`anchor_k` must be one of the declared ks {self.ks}, got {self.anchor_k}")
        if self.method not in ("phds", "oracle", "base"):
            raise ValueError(f"`method` must be 'phds', 'oracle' or 'base', got {self.method!r}")
        if self.method == "oracle" and len(self.ks) != 1:
            raise ValueError(f"an oracle is trained at one fixed k, got ks={self.ks}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sidecar:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{SIDECAR_NAME} has unknown fields {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**data)


def write_sidecar(directory: str | os.PathLike, sidecar: Sidecar) -> Path:
    """Write `directory/phds.json` atomically (write a temporary file, then rename).

    Example: `write_sidecar("out", Sidecar(ks=[2, 3, 4], k_pre=4))`.
    """
    path = Path(directory) / SIDECAR_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sidecar.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_sidecar(directory: str | os.PathLike) -> Sidecar | None:
    """The sidecar of a local checkpoint directory, or None when it has none.

    Example: `read_sidecar("out").ks`.
    """
    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return Sidecar.from_dict(data)
