"""Endpoints about the server itself: ``/healthz`` for load balancers and ``/metrics`` for Prometheus."""

from __future__ import annotations

from tornado.web import RequestHandler

from .backend import GitBackend
from .httpserver import SERVER_NAME


class StatusHandler(RequestHandler):
    """Base of the endpoints here: they name the server as every gittornado response does."""

    def set_default_headers(self) -> None:
        """``Server: gittornado``, not Tornado's name and exact release."""
        self.set_header("Server", SERVER_NAME)


class HealthHandler(StatusHandler):
    """``GET /healthz`` for load balancers: answers while the server is serving."""

    SUPPORTED_METHODS = ("GET", "HEAD")

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish("ok\n")

    def head(self) -> None:
        self.get()


class MetricsHandler(StatusHandler):
    """``GET /metrics``: Prometheus text format, no authentication, no repository names."""

    SUPPORTED_METHODS = ("GET",)

    def initialize(self, backend: GitBackend) -> None:
        self.metrics = backend.metrics

    def get(self) -> None:
        assert self.metrics is not None
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.metrics.exposition())
