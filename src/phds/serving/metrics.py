"""Prometheus metrics of one server, in its own registry (no process-global state, so tests can run many servers).

Served at `GET /metrics`. Names start with `phds_`; per-k series carry the label `k` (the k a request ran at).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class ServingMetrics:
    """The server's counters, gauges and histograms.

    Example: `metrics.requests.labels(k="2", endpoint="chat", finish_reason="stop").inc()`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "phds_requests",
            "Finished requests by k, endpoint and finish reason.",
            ["k", "endpoint", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("phds_prompt_tokens", "Prompt tokens by k.", ["k"], registry=r)
        self.generation_tokens = Counter("phds_generation_tokens", "Generated tokens by k.", ["k"], registry=r)
        self.errors = Counter("phds_errors", "Error answers by type and HTTP status.", ["type", "status"], registry=r)
        self.cancelled = Counter(
            "phds_cancelled_requests",
            "Requests ended before they finished, by reason: client_disconnected, shutdown (the drain bound passed).",
            ["reason"],
            registry=r,
        )
        self.failed = Counter(
            "phds_failed_requests", "Requests the engine failed, by reason (engine_error).", ["reason"], registry=r
        )
        self.queue_depth = Gauge("phds_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.running = Gauge("phds_running_requests", "Requests in the running batch.", registry=r)
        self.request_latency = Histogram(
            "phds_request_latency_seconds",
            "Arrival to last token, by k.",
            ["k"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "phds_time_to_first_token_seconds",
            "Arrival to first token, by k.",
            ["k"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "phds_time_per_output_token_seconds",
            "Mean gap between output tokens of a request, by k.",
            ["k"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.auto_k_chosen = Counter("phds_auto_k_chosen", "k picked for k='auto' requests.", ["k"], registry=r)
        self.auto_k_latency_ms = Gauge(
            "phds_auto_k_latency_ms",
            "Recent median per-token latency the auto-k policy sees, by k (ms).",
            ["k"],
            registry=r,
        )
        self.auto_k_target_ms = Gauge("phds_auto_k_target_ms", "The auto-k per-token latency target.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
