"""The API's own metrics, through ``ray.util.metrics``: exported with Ray's on each node's metrics port, so
the Ray dashboard, Prometheus and Grafana see them beside Serve's (Prometheus adds the ``ray_`` prefix).

Metric objects can be made outside Ray (unit tests build app parts without ``ray.init``): ``ray.util.metrics``
then records nowhere, which is what a test without Ray wants.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

# LLM request latency spans a cached short answer (~10 ms) to a long generation on CPU (a minute).
LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0]
# Ray exports a histogram's `_sum` from bucket midpoints, not the observed values (a size-1 batch in the bucket
# (0, 1] would count as 0.5). Half-integer edges put the midpoints of the small buckets on the sizes themselves, so
# `_sum / _count` is the true mean batch size up to 4 and close above.
BATCH_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 24.5, 32.5, 48.5, 64.5]
STORE_WRITE_OUTCOMES = ("retry", "expired", "rejected", "queue_full")


class ServeMetrics:
    def __init__(self) -> None:
        self._requests = Counter(
            "chatforge_requests_total",
            description="chat completion requests by variant and outcome (ok, error status codes, blocked)",
            tag_keys=("variant", "status"),
        )
        self._tokens = Counter(
            "chatforge_tokens_total",
            description="prompt and completion tokens by variant",
            tag_keys=("variant", "kind"),
        )
        self._latency = Histogram(
            "chatforge_request_latency_seconds",
            description="time from request to last token, seconds",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("variant",),
        )
        self._batch = Histogram(
            "chatforge_batch_size",
            description="requests per @serve.batch call",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("variant",),
        )
        self._guard_blocks = Counter(
            "chatforge_guard_blocks_total",
            description="requests refused by the toxicity guard, on the input or the output",
            tag_keys=("variant", "where"),
        )
        self._feedback = Counter(
            "chatforge_feedback_total",
            description="feedback received by rating (-1, 0, 1)",
            tag_keys=("rating",),
        )
        self._store_errors = Counter(
            "chatforge_feedback_write_errors_total",
            description="failed writes to the feedback store by record (schema, completion, feedback) and outcome: "
            "retry (tried again later), expired (dropped after retry_window_s), rejected (refused by the database, "
            "dropped), queue_full (not queued: the queue was full)",
            tag_keys=("record", "outcome"),
        )
        self._store_queue = Gauge(
            "chatforge_feedback_queue_depth",
            description="writes an ingress replica holds for the feedback store (waiting for it or retrying)",
        )
        self._sequences = Gauge(
            "chatforge_engine_sequences",
            description="sequences in a replica's engine: running in the batch or waiting for a slot",
            tag_keys=("variant", "state"),
        )

    def request(self, variant: str, status: str) -> None:
        self._requests.inc(1, tags={"variant": variant, "status": str(status)})

    def tokens(self, variant: str, prompt: int, completion: int) -> None:
        if prompt:
            self._tokens.inc(prompt, tags={"variant": variant, "kind": "prompt"})
        if completion:
            self._tokens.inc(completion, tags={"variant": variant, "kind": "completion"})

    def latency(self, variant: str, seconds: float) -> None:
        self._latency.observe(seconds, tags={"variant": variant})

    def batch(self, variant: str, size: int) -> None:
        self._batch.observe(size, tags={"variant": variant})

    def guard_block(self, variant: str, where: str) -> None:
        if where not in ("input", "output"):
            raise ValueError(f"where must be 'input' or 'output', got {where!r}")
        self._guard_blocks.inc(1, tags={"variant": variant, "where": where})

    def feedback(self, rating: int) -> None:
        self._feedback.inc(1, tags={"rating": str(rating)})

    def store_write_error(self, record: str, outcome: str) -> None:
        if outcome not in STORE_WRITE_OUTCOMES:
            raise ValueError(f"outcome must be one of {STORE_WRITE_OUTCOMES}, got {outcome!r}")
        self._store_errors.inc(1, tags={"record": record, "outcome": outcome})

    def store_queue(self, depth: int) -> None:
        self._store_queue.set(depth)

    def engine_load(self, variant: str, running: int, waiting: int) -> None:
        """Set from ``Engine.stats()``; optional (not every caller has an engine at hand)."""
        self._sequences.set(running, tags={"variant": variant, "state": "running"})
        self._sequences.set(waiting, tags={"variant": variant, "state": "waiting"})
