"""`k: "auto"`: load-adaptive sparsity. Pick the largest declared k whose recent per-token latency meets a target.

The policy is pure bookkeeping (no threads, no model): the service reports each finished request's per-token latency
at its k (measured under whatever load there was, so a busy server reports slower tokens), and asks for a k when an
auto request arrives, passing the current queue depth.

Rules, in order:
1. A k is *too slow* when its recent median per-token latency exceeds the target. Latency is assumed not to fall as
   k grows (more experts, more work), so every k above a too-slow k is too slow as well.
2. A k with no recent sample is presumed fast enough unless rule 1 rules it out: that is how a large k is tried
   again once its old samples age out (`horizon_s`) after the load drops.
3. The queue lowers the choice by one declared k per `queue_step` waiting requests, so a backlog drains at smaller
   k before the latency samples catch up.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from phds.sidecar import check_ks


@dataclass(kw_only=True)
class AutoKPolicy:
    """Chooses k for `k="auto"` requests.

    Attributes:
        ks: the declared ks.
        target_ms: per-token latency target in milliseconds.
        window: samples kept per k (the most recent ones).
        horizon_s: samples older than this are forgotten, so a k ruled out under load is retried later.
        queue_step: waiting requests that lower the choice by one declared k.
        clock: seconds, monotonic; injectable for tests.

    Example:
        >>> policy = AutoKPolicy(ks=[1, 2, 4], target_ms=20.0)
        >>> policy.observe(4, 35.0); policy.observe(2, 15.0)
        >>> policy.choose(queue_depth=0)
        2
    """

    ks: list[int]
    target_ms: float
    window: int = 16
    horizon_s: float = 30.0
    queue_step: int = 4
    clock: Callable[[], float] = time.monotonic
    _samples: dict[int, deque] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ks = check_ks(self.ks)
        if not self.target_ms > 0:
            raise ValueError(f"`target_ms` must be > 0, got {self.target_ms}")
        if self.window < 1:
            raise ValueError(f"`window` must be >= 1, got {self.window}")
        if self.queue_step < 1:
            raise ValueError(f"`queue_step` must be >= 1, got {self.queue_step}")
        self._samples = {k: deque(maxlen=self.window) for k in self.ks}

    def observe(self, k: int, per_token_ms: float) -> None:
        """Record one finished request's mean per-token latency at `k` (ms). Unknown ks are ignored."""
        if k in self._samples and per_token_ms >= 0:
            self._samples[k].append((self.clock(), float(per_token_ms)))

    def latency_ms(self, k: int) -> float | None:
        """The recent median per-token latency at `k`, or None without recent samples."""
        cutoff = self.clock() - self.horizon_s
        recent = [ms for at, ms in self._samples.get(k, ()) if at >= cutoff]
        return statistics.median(recent) if recent else None

    def fast_enough(self) -> list[int]:
        """Declared ks presumed to meet the target (rules 1 and 2), ascending; may be empty."""
        allowed = []
        for k in self.ks:
            latency = self.latency_ms(k)
            if latency is not None and latency > self.target_ms:
                break  # rule 1: this k and every larger one are too slow
            allowed.append(k)
        return allowed

    def choose(self, queue_depth: int = 0) -> int:
        """The k for an auto request arriving now, with `queue_depth` requests waiting for a slot."""
        if queue_depth < 0:
            raise ValueError(f"`queue_depth` must be >= 0, got {queue_depth}")
        allowed = self.fast_enough()
        # Nothing meets the target: the smallest k is the fastest there is.
        index = len(allowed) - 1 if allowed else 0
        index = max(0, index - queue_depth // self.queue_step)
        return self.ks[index]
