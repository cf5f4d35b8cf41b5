"""Prometheus metrics of the server (prometheus_client), in their own registry so that apps do not share them.

lesion_serve_requests_total{route,method,status}, lesion_serve_request_seconds{route} (latency histogram),
lesion_serve_errors_total{route,status} (4xx and 5xx answers) and lesion_serve_batch_images (images per
forward pass of the micro-batcher: how much batching happens).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lesion_serve_requests", "HTTP requests answered", ("route", "method", "status"),
                                registry=self.registry)
        self.latency = Histogram("lesion_serve_request_seconds", "Time to answer a request", ("route",),
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.errors = Counter("lesion_serve_errors", "Requests answered with a 4xx or 5xx status", ("route", "status"),
                              registry=self.registry)
        self.batch = Histogram("lesion_serve_batch_images", "Images per forward pass of the micro-batcher",
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
