"""Endpoints about the server itself: ``/healthz`` for load balancers and ``/metrics`` for Prometheus."""

from __future__ import annotations

from tornado.web import RequestHandler

from .backend import GitBackend


class HealthHandler(RequestHandler):
    """``GET /healthz`` for load balancers: answers while the server is serving."""

    SUPPORTED_METHODS = ("GET", "HEAD")

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish("ok\n")

    def head(self) -> None:
        self.get()


class MetricsHandler(RequestHandler):
    """``GET /metrics``: Prometheus text format, no authentication, no repository names."""

    SUPPORTED_METHODS = ("GET",)

    def initialize(self, backend: GitBackend) -> None:
        self.metrics = backend.metrics

    def get(self) -> None:
        assert self.metrics is not None
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.metrics.exposition())
