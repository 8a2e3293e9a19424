"""Seeing what the server does: one access-log line per request, and metrics.

Both are fed from one place, :meth:`RequestObserver.log_request`, which an
Application calls when a request ends (its ``log_function`` setting), so the
log and the metrics can never disagree.

The access log (logger ``gittornado.access``, level INFO) writes one line per
request as space-separated ``key=value`` pairs, in this order::

    time=2026-11-22T00:40:12.345Z client=203.0.113.9 user=alice auth=password
    repo=team/app.git service=git-upload-pack method=POST status=200 in=1187
    out=5234012 duration_ms=840.2 git_exit=0

``auth`` says how the user logged in, as the policy tells (a ``user`` with
an ``auth`` attribute): ``password``, or ``token:<id>`` for a users.ini token.
``-`` stands for "none" (anonymous, no repository, no git process); values
with spaces, quotes or control characters are written as JSON strings, so the
line always splits cleanly.  Status 499 means the client left before the
response was complete.  Passwords and Authorization headers are never logged.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional

from tornado.ioloop import PeriodicCallback
from tornado.web import RequestHandler

access_log = logging.getLogger("gittornado.access")

_PLAIN = re.compile(r"[A-Za-z0-9._:/@+=,-]+")


def _value(value: Any) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def request_fields(handler: RequestHandler) -> Dict[str, Any]:
    """What one finished request did, in the access log's field order."""
    request = handler.request
    pipe = getattr(handler, "pipe", None)
    user = getattr(handler, "user", None)
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "client": request.remote_ip,
        "user": user,
        "auth": getattr(user, "auth", None),
        "repo": getattr(handler, "repository", None),
        "service": getattr(handler, "service_label", None),
        "method": request.method,
        "status": handler.get_status(),
        "in": getattr(handler, "bytes_in", 0),
        "out": getattr(handler, "bytes_out", 0),
        "duration_ms": round(request.request_time() * 1000, 1),
        "git_exit": pipe.exit_status if pipe is not None else None,
    }


def format_fields(fields: Dict[str, Any]) -> str:
    """One access-log line from :func:`request_fields`."""
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


class Metrics:
    """Prometheus metrics of one application, in a registry of their own.

    Needs the ``prometheus_client`` package (``pip install gittornado[metrics]``).
    Labels carry the service and status only, never repository names, so the
    metrics reveal nothing about which repositories exist.

    ``shared_dir`` is for a server of several processes: each keeps its values
    in files there (prometheus_client's multiprocess mode, which
    ``PROMETHEUS_MULTIPROC_DIR`` must name before prometheus_client is first
    imported), and every scrape, whichever process answers it, reports the sum
    over all of them.
    """

    def __init__(self, running_processes: Any, shared_dir: Optional[str] = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError:  # pragma: no cover - depends on the installation
            raise RuntimeError("metrics need prometheus_client: pip install 'gittornado[metrics]'") from None
        self._prom = prom
        self._shared_dir = shared_dir
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "gittornado_requests", "Requests answered", ["service", "status"], registry=self.registry
        )
        self.bytes_in = prom.Counter(
            "gittornado_received_bytes", "Request body bytes received", ["service"], registry=self.registry
        )
        self.bytes_out = prom.Counter(
            "gittornado_sent_bytes", "Response body bytes sent", ["service"], registry=self.registry
        )
        self.duration = prom.Histogram(
            "gittornado_request_duration_seconds",
            "Time from request start to its end",
            ["service"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
            registry=self.registry,
        )
        self.auth_failures = prom.Counter(
            "gittornado_auth_failures",
            "Requests refused for wrong or unknown credentials",
            registry=self.registry,
        )
        self.pushes_refused = prom.Counter(
            "gittornado_pushes_refused",
            "Pushes the push limits refused, by reason (file-size, quota, lfs-lock, push-size)",
            ["reason"],
            registry=self.registry,
        )
        self.token_logins = prom.Counter(
            "gittornado_token_logins", "Requests a token (not a password) logged in", registry=self.registry
        )
        self.maintenance_runs = prom.Counter(
            "gittornado_maintenance_runs",
            "Maintenance runs after pushes, by result (ok, failed, broken: git fsck found damage)",
            ["result"],
            registry=self.registry,
        )
        self.maintenance_duration = prom.Histogram(
            "gittornado_maintenance_duration_seconds",
            "Time one repository's maintenance took",
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 7200),
            registry=self.registry,
        )
        self.repositories_disk_bytes = prom.Gauge(
            "gittornado_repositories_disk_bytes",
            "Bytes the repositories take on disk, measured every few minutes",
            registry=self.registry,
            multiprocess_mode="max",
        )
        running = prom.Gauge(
            "gittornado_git_processes",
            "git processes running",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        #: Collectors whose values are read from elsewhere on every scrape (see :meth:`watch_pack_cache`).
        self._readers: List[Any] = []
        if shared_dir is None:
            running.set_function(lambda: len(running_processes.running))
        else:  # a value in a file cannot be a function: sample it
            PeriodicCallback(lambda: running.set(len(running_processes.running)), 1000).start()

    def watch_pack_cache(self, cache: Any) -> None:
        """Report a :class:`~gittornado.packcache.PackCache`'s statistics (read on each scrape)."""
        reader = PackCacheCollector(cache)
        self.registry.register(reader)
        self._readers.append(reader)

    def push_refused(self, reason: str) -> None:
        """Count a push the push limits refused (``file-size``, ``quota``, ``lfs-lock``, ``push-size``)."""
        self.pushes_refused.labels(reason).inc()

    def maintenance_finished(self, result: str, seconds: float) -> None:
        """Count one maintenance run (see :mod:`gittornado.maintenance`)."""
        self.maintenance_runs.labels(result).inc()
        self.maintenance_duration.observe(seconds)

    def observe(self, fields: Dict[str, Any], had_credentials: bool) -> None:
        """Count one finished request."""
        service = fields["service"] or "none"
        self.requests.labels(service, str(fields["status"])).inc()
        self.bytes_in.labels(service).inc(fields["in"])
        self.bytes_out.labels(service).inc(fields["out"])
        self.duration.labels(service).observe(fields["duration_ms"] / 1000)
        if had_credentials and fields["status"] in (401, 429):
            self.auth_failures.inc()
        if str(fields["auth"]).startswith("token:"):
            self.token_logins.inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        if self._shared_dir is None:
            return self._prom.generate_latest(self.registry)
        from prometheus_client import multiprocess

        every_process = self._prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(every_process, path=self._shared_dir)
        for reader in self._readers:
            every_process.register(reader)
        return self._prom.generate_latest(every_process)


class PackCacheCollector:
    """The pack cache's statistics as Prometheus metrics, read when scraped.

    Counters come from the cache directory's counter files (every host that
    shares it); entries and bytes on disk from the server's last scan.
    """

    #: statistics key -> (metric name, help, counter?)
    METRICS = {
        "hits": ("gittornado_pack_cache_hits", "Fetches answered from the pack cache", True),
        "misses": ("gittornado_pack_cache_misses", "Fetches that ran pack-objects", True),
        "served_bytes": ("gittornado_pack_cache_served_bytes", "Pack bytes sent from the cache", True),
        "written_bytes": ("gittornado_pack_cache_written_bytes", "Bytes written into the cache", True),
        "errors": ("gittornado_pack_cache_errors", "Fetches served uncached for a cache fault", True),
        "entries": ("gittornado_pack_cache_entries", "Complete entries on disk", False),
        "disk_bytes": ("gittornado_pack_cache_disk_bytes", "Bytes the cache takes on disk", False),
    }

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        statistics = self.cache.statistics()
        for key, (name, text, counter) in self.METRICS.items():
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(name, text, value=statistics[key])


class RequestObserver:
    """The ``log_function`` of a gittornado Application: access log, then metrics."""

    def __init__(self, metrics: Optional[Metrics] = None) -> None:
        self.metrics = metrics

    def log_request(self, handler: RequestHandler) -> None:
        """Called by Tornado once per finished request."""
        fields = request_fields(handler)
        status = fields["status"]
        level = logging.INFO if status < 500 or status == 503 else logging.WARNING
        access_log.log(level, "%s", format_fields(fields))
        if self.metrics is not None:
            self.metrics.observe(fields, "Authorization" in handler.request.headers)
