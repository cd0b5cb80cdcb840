"""Prometheus metrics of one app (its own registry, so two apps in one process do not share counters):
requests by route and status, prompt and generated tokens, queue depth and batch occupancy read from the
schedulers when scraped, time to first token and inter-token latency measured from the scheduler's own
timestamps (when each token was sampled, not when the event loop got round to it)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, models: list) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("camelid_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("camelid_prompt_tokens", "prompt tokens of finished requests", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("camelid_generation_tokens", "tokens generated", ["model"], registry=r)
        self.ttft = Histogram("camelid_time_to_first_token_seconds", "request start to its first token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("camelid_inter_token_latency_seconds", "time between two tokens of one request",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        queue = Gauge("camelid_queue_depth", "requests waiting for a batch row", ["model"], registry=r)
        rows = Gauge("camelid_batch_rows_busy", "batch rows decoding a request", ["model"], registry=r)
        occupancy = Gauge("camelid_batch_occupancy", "busy rows / rows", ["model"], registry=r)
        for m in models:
            sched = m.scheduler
            queue.labels(m.id).set_function(lambda s=sched: s.load[1])
            rows.labels(m.id).set_function(lambda s=sched: s.load[0])
            occupancy.labels(m.id).set_function(lambda s=sched: s.load[0] / s.max_batch)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware counting answered requests by route template (not raw path: bounded labels)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
            self.metrics.requests.labels(path, str(status[0] or 499)).inc()
