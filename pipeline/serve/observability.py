"""What `vae serve` reports about itself: Prometheus counters and histograms, and the ASGI
middleware that counts every request by route and status."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("vae_requests", "HTTP requests", ["route", "code"], registry=self.registry)
        self.errors = Counter("vae_errors", "HTTP requests answered with 4xx or 5xx", ["route"], registry=self.registry)
        self.latency = Histogram("vae_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
        self.batch = Histogram("vae_batch_size", "latent vectors or images per model call", ["model"],
                               registry=self.registry, buckets=tuple(2**i for i in range(11)))

    def observe(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)
        if code >= 400:
            self.errors.labels(route).inc()


class Observe:
    """Pure ASGI middleware counting every request by route and status. (FastAPI's
    @app.middleware wraps each response in a stream and costs more than a decode.)"""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:  # the router has put the matched route in scope by now
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, status, time.perf_counter() - start)
