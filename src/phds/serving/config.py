"""`ServeConfig`: everything `phds serve` takes (the CLI's options are these field names), and the served ks."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from phds import sidecar


@dataclass(kw_only=True)
class ServeConfig:
    """How to serve one checkpoint.

    Attributes:
        model: checkpoint directory, hub name, or `tiny:<family>`.
        served_model_name: the name clients use; defaults to the checkpoint directory's name.
        k_set: the ks requests may ask for; defaults to the sidecar's declared ks, else [k_pre].
        default_k: k of a request that names none; defaults to the sidecar's default k, else k_pre.
        allocation: serve every request at this per-layer k: a `phds allocate` file (or its `{layer_index: k}`
            dict, as `phds.allocation.load_allocation` returns it), naming every MoE layer. A request that names a k
            (body `k`, `NAME@k2`, `NAME@auto`) is then refused with a 400; responses report the largest per-layer
            k as their `k`. Excludes `k_set`, `default_k` and `auto_target_ms`.
        host: bind address (loopback unless told otherwise).
        port: TCP port (0 picks a free one).
        api_key: when set, `/v1/*` needs `Authorization: Bearer <api_key>` (else 401).
        max_batch: requests decoded together (the engine's batch slots).
        max_queue: requests allowed to wait for a slot; beyond that the server answers 503 with Retry-After.
        max_model_len: prompt plus completion tokens; defaults to the model's `max_position_embeddings`.
        auto_target_ms: per-token latency target enabling `k: "auto"` (None: auto is refused with a 400).
        auto_queue_step: waiting requests that lower an auto request's k by one declared step.
        drain_timeout_s: on SIGTERM, how long in-flight requests may take to finish; the rest get 503 shutting_down.
        max_body_mb: largest request body accepted (MB); a larger one is answered with a 413 before it is parsed.
        dtype: "auto", "float32", "bfloat16" or "float16".
        device: defaults to CUDA when present, else CPU.
        compile: let the engine `torch.compile` its decode step.
        threads: CPU threads of a decode step; None: every usable core less those other processes keep busy,
            re-read before each step (`phds.engine.threads.ThreadPolicy`; chosen once at start-up when compiling).
        trust_remote_code: allow the checkpoint's own modelling code (off by default).

    Example: `ServeConfig(model="out/olmoe-phds", k_set=[1, 2, 4], auto_target_ms=40.0)`.
    """

    model: str
    served_model_name: str | None = None
    k_set: list[int] | None = None
    default_k: int | None = None
    allocation: str | os.PathLike | Mapping[int, int] | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_model_len: int | None = None
    auto_target_ms: float | None = None
    auto_queue_step: int = 4
    drain_timeout_s: float = 30.0
    max_body_mb: float = 4.0
    dtype: str = "auto"
    device: str | None = None
    compile: bool = False
    threads: int | None = None
    trust_remote_code: bool = False
    log_level: str = field(default="warning")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"`port` must be in [0, 65535], got {self.port}")
        if self.host != "localhost":
            try:
                ipaddress.ip_address(self.host)
            except ValueError:
                raise ValueError(f"`host` must be an IP address or 'localhost', got {self.host!r}") from None
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"`threads` must be an integer >= 1 or None, got {self.threads!r}")
        for name in ("max_batch", "auto_queue_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"`max_queue` must be >= 0, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"`max_model_len` must be >= 2, got {self.max_model_len}")
        if self.auto_target_ms is not None and not self.auto_target_ms > 0:
            raise ValueError(f"`auto_target_ms` must be > 0, got {self.auto_target_ms}")
        if not self.max_body_mb > 0:
            raise ValueError(f"`max_body_mb` must be > 0, got {self.max_body_mb}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"`drain_timeout_s` must be >= 0, got {self.drain_timeout_s}")
        if self.k_set is not None:
            self.k_set = sidecar.check_ks(self.k_set, name="k_set")
        if self.k_set is not None and self.default_k is not None:
            sidecar.check_default_k(self.default_k, self.k_set)
        if self.allocation is not None:
            self.allocation = _read_allocation(self.allocation)
            others = [name for name in ("k_set", "default_k", "auto_target_ms") if getattr(self, name) is not None]
            if others:
                raise ValueError(
                    f"`allocation` serves every request at one per-layer k; drop `{others[0]}` (it picks ks per "
                    "request), or drop `allocation`"
                )
        if self.served_model_name is not None and ("@" in self.served_model_name or not self.served_model_name):
            raise ValueError(f"`served_model_name` must be non-empty without '@', got {self.served_model_name!r}")


def _read_allocation(allocation: str | os.PathLike | Mapping[int, int]) -> dict[int, int]:
    # Imported here: `phds.allocation` reads training data, which a protocol-only user of the config never needs.
    from phds.allocation import check_allocation, load_allocation

    if isinstance(allocation, Mapping):
        return check_allocation(dict(allocation), what="`allocation`")
    return load_allocation(allocation)


def resolve_ks(model, k_set: list[int] | None, default_k: int | None) -> tuple[list[int], int]:
    """The served ks and default k: `k_set` if given, else the sidecar's, else [k_pre] (`phds.sidecar.resolve_ks`).

    Example: `resolve_ks(model, None, None) == ([1, 2, 4], 4)` for a checkpoint whose sidecar declares 1, 2, 4.
    """
    return sidecar.resolve_ks(model, k_set, default_k, name="k_set")


def served_name(model: str) -> str:
    """The model name clients use by default: a checkpoint directory's name, else the name as given."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model
