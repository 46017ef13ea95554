"""Operating a guard in a service: Prometheus metrics and health endpoints.

Metrics (need ``pip install 'p11guard[metrics]'``, i.e. ``prometheus_client``)::

    from prometheus_client import CollectorRegistry
    from p11guard.metrics import register, serve_metrics

    registry = CollectorRegistry()
    register(guard, registry)              # one guard per registry; yours, never the global one
    server = serve_metrics(registry, port=9464)   # for a script with no web server; server.stop()

Health (no dependency)::

    from p11guard.metrics import health_asgi, health_wsgi

    app = health_wsgi(guard)                          # 200 JSON while serving, 503 JSON why not
    app = health_asgi(guard, sign_key="health-key")   # plus a test signature at most every 10 s

Names are imported on first use: the health apps never load ``prometheus_client``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p11guard.base import lazy_exports

if TYPE_CHECKING:
    from p11guard.metrics._collector import GuardCollector
    from p11guard.metrics._health import HealthASGI, HealthCheck, HealthWSGI, health_asgi, health_wsgi
    from p11guard.metrics._observer import OUTCOMES, OpStats, outcome_of
    from p11guard.metrics._register import GuardMetrics, register
    from p11guard.metrics._serve import MetricsServer, serve_metrics

__all__ = [
    "OUTCOMES",
    "GuardCollector",
    "GuardMetrics",
    "HealthASGI",
    "HealthCheck",
    "HealthWSGI",
    "MetricsServer",
    "OpStats",
    "health_asgi",
    "health_wsgi",
    "outcome_of",
    "register",
    "serve_metrics",
]

_HOMES = {
    "GuardCollector": "_collector",
    "HealthASGI": "_health",
    "HealthCheck": "_health",
    "HealthWSGI": "_health",
    "health_asgi": "_health",
    "health_wsgi": "_health",
    "OUTCOMES": "_observer",
    "OpStats": "_observer",
    "outcome_of": "_observer",
    "GuardMetrics": "_register",
    "register": "_register",
    "MetricsServer": "_serve",
    "serve_metrics": "_serve",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
