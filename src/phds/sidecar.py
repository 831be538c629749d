"""`phds.json`: the small file beside a plain HF checkpoint that declares which ks it was made for.

This module owns the declared-ks rules, for every reader: `check_ks` (a non-empty list of distinct positive ints,
each at most the model's experts), `default_k` (k_pre when declared, else the largest declared k), `resolve_ks`
(the ks and default k a loaded model serves or is evaluated at), and the sidecar's own field checks.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SIDECAR_NAME = "phds.json"
FORMAT_VERSION = 1
METHODS = ("phds", "oracle", "base")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def check_ks(ks: Sequence[int] | None, *, name: str = "ks", num_experts: int | None = None) -> list[int]:
    """`ks` sorted, after checking it is a non-empty list of distinct positive ints, each at most `num_experts`.

    Example: `check_ks([4, 2, 3], num_experts=8) == [2, 3, 4]`.
    """
    if (
        isinstance(ks, (str, bytes))
        or not isinstance(ks, Sequence)
        or not ks
        or not all(_is_positive_int(k) for k in ks)
    ):
        raise ValueError(f"`{name}` must be a non-empty list of positive ints, got {name}={ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"`{name}` must not repeat a k, got {name}={list(ks)!r}")
    outside = sorted(k for k in ks if num_experts is not None and k > num_experts)
    if outside:
        raise ValueError(
            f"every k in `{name}` must be between 1 and the model's number of experts ({num_experts}), "
            f"got {name}={sorted(ks)}: {outside} too large"
        )
    return sorted(int(k) for k in ks)


def check_k(k: int, *, name: str = "k", num_experts: int | None = None) -> int:
    """One k, checked like a declared k (`check_ks`).

    Example: `check_k(2, num_experts=8) == 2`.
    """
    if not _is_positive_int(k):
        raise ValueError(f"`{name}` must be a positive int, got {name}={k!r}")
    if num_experts is not None and k > num_experts:
        raise ValueError(
            f"`{name}` must be between 1 and the model's number of experts ({num_experts}), got {name}={k}"
        )
    return int(k)


def default_k(ks: Sequence[int], k_pre: int) -> int:
    """The k a model declaring `ks` runs at when none is asked for: k_pre when declared, else the largest k.

    Example: `default_k([1, 2], 4) == 2`.
    """
    return k_pre if k_pre in ks else max(ks)


def check_default_k(default: int, ks: Sequence[int]) -> int:
    """`default`, after checking it is one of `ks`.

    Example: `check_default_k(2, [2, 4]) == 2`.
    """
    if isinstance(default, bool) or default not in ks:
        raise ValueError(f"`default_k` must be one of the declared ks {sorted(ks)}, got default_k={default!r}")
    return default


@dataclass(kw_only=True)
class Sidecar:
    """What a PHDS checkpoint declares.

    Attributes:
        ks: the declared k set, ascending.
        k_pre: the pretrained `num_experts_per_tok` (unchanged in the checkpoint's config).
        default_k: the k a loader dials by default (must be in `ks`; default: `default_k(ks, k_pre)`).
        method: "phds" for a checkpoint trained over `ks`, "oracle" for a fixed-k fine-tune, "base" otherwise.
        anchor_k: the curriculum's anchor k (PHDS only).
        made_by: free-form provenance: schedule, data, steps, seed, versions, selection.
        validation_loss: per-k validation loss, keyed by k as a string (JSON keys are strings); the ks are the
            evaluated ones, which may go beyond the declared ks.
        format_version: the file format; only `FORMAT_VERSION` is understood.
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
        self.ks = check_ks(self.ks)
        if not _is_positive_int(self.k_pre):
            raise ValueError(f"`k_pre` must be a positive int, got k_pre={self.k_pre!r}")
        if self.default_k is None:
            self.default_k = default_k(self.ks, self.k_pre)
        if not _is_positive_int(self.default_k):  # 2.0 == 2 would pass the membership test below
            raise ValueError(f"`default_k` must be a positive int, got default_k={self.default_k!r}")
        check_default_k(self.default_k, self.ks)
        if self.anchor_k is not None and (self.anchor_k not in self.ks or not _is_positive_int(self.anchor_k)):
            raise ValueError(f"`anchor_k` must be one of the declared ks {self.ks}, got anchor_k={self.anchor_k!r}")
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got method={self.method!r}")
        if self.method == "oracle" and len(self.ks) != 1:
            raise ValueError(f"an oracle is trained at one fixed k, got ks={self.ks}")
        if not isinstance(self.made_by, dict):
            raise ValueError(f"`made_by` must be a JSON object, got {type(self.made_by).__name__}")
        if not isinstance(self.validation_loss, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, numbers.Real) and not isinstance(v, bool)
            for k, v in self.validation_loss.items()
        ):
            raise ValueError(
                '`validation_loss` must map k (a string of digits) to a number, e.g. {"2": 1.5}, '
                f"got validation_loss={self.validation_loss!r}"
            )
        if (
            not isinstance(self.format_version, int)
            or isinstance(self.format_version, bool)
            or (self.format_version != FORMAT_VERSION)
        ):
            raise ValueError(
                f"`format_version` {self.format_version!r} is not understood by this phds (it reads "
                f"version {FORMAT_VERSION}); upgrade phds"
            )

    def check_model(self, *, num_experts: int, k_pre: int) -> None:
        """Raise when the sidecar does not describe a model of `num_experts` experts per layer and this `k_pre`.

        Example: `sidecar.check_model(num_experts=dial.num_experts(model), k_pre=dial.k_pre(model))`.
        """
        check_ks(self.ks, num_experts=num_experts)
        if self.k_pre != k_pre:
            raise ValueError(
                f"`k_pre`={self.k_pre} does not match the model, whose config says {k_pre} experts per token; "
                "the sidecar belongs to another checkpoint"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | os.PathLike = SIDECAR_NAME) -> Sidecar:
        """Build from parsed JSON; every error names `source` and the field.

        Example: `Sidecar.from_dict({"ks": [2, 4], "k_pre": 4})`.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source} has unknown fields {sorted(unknown)}; known fields are {sorted(known)}")
        missing = [name for name in ("ks", "k_pre") if name not in data]
        if missing:
            raise ValueError(f"{source} lacks the required field(s) {missing}")
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def attach_sidecar(model, sidecar: Sidecar | None) -> None:
    """Remember the sidecar a model was loaded with (`phds.load` does this).

    Example: `attach_sidecar(model, read_sidecar("out"))`.
    """
    model._phds_sidecar = sidecar


def sidecar_of(model) -> Sidecar | None:
    """The `phds.json` sidecar the model was loaded with, if any.

    Example: `phds.loading.sidecar_of(model).ks`.
    """
    return getattr(model, "_phds_sidecar", None)


def resolve_ks(
    model, ks: Sequence[int] | None = None, default: int | None = None, *, name: str = "ks"
) -> tuple[list[int], int]:
    """The ks a loaded model runs at and its default k: `ks` if given, else its sidecar's, else [k_pre]; checked
    against the model's experts. `default` must be one of them (default: the sidecar's if among them, else
    `default_k(ks, k_pre)`).

    Example: `resolve_ks(model) == ([1, 2, 4], 4)` for a checkpoint whose sidecar declares 1, 2, 4.
    """
    from phds import dial

    sidecar = sidecar_of(model)
    k_pre = dial.k_pre(model)
    if ks is not None:
        resolved = check_ks(ks, name=name, num_experts=dial.num_experts(model))
        if sidecar is not None and not set(resolved) <= set(sidecar.ks):
            logger.warning("ks %s go beyond the checkpoint's declared ks %s", resolved, sidecar.ks)
    elif sidecar is not None:
        resolved = list(sidecar.ks)
    else:
        resolved = [k_pre]
    if default is None:
        default = sidecar.default_k if sidecar is not None and sidecar.default_k in resolved else None
        default = default if default is not None else default_k(resolved, k_pre)
    return resolved, check_default_k(default, resolved)


def write_sidecar(directory: str | os.PathLike, sidecar: Sidecar) -> Path:
    """Write `directory/phds.json` atomically (write a temporary file, then rename).

    Example: `write_sidecar("out", Sidecar(ks=[2, 3, 4], k_pre=4))`.
    """
    path = Path(directory) / SIDECAR_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sidecar.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_sidecar(directory: str | os.PathLike, *, model=None) -> Sidecar | None:
    """The sidecar of a local checkpoint directory, or None when it has none; checked against `model` if given.

    Every error is a ValueError naming the file and the field.

    Example: `read_sidecar("out").ks`.
    """
    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid UTF-8 (byte {error.start}); rewrite it as UTF-8 JSON") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    sidecar = Sidecar.from_dict(data, source=path)
    if model is not None:
        from phds import dial

        try:
            sidecar.check_model(num_experts=dial.num_experts(model), k_pre=dial.k_pre(model))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    return sidecar
