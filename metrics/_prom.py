"""The one import of prometheus_client (an optional dependency): a clear error without it."""

from __future__ import annotations

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
except ImportError as exc:
    raise ImportError(
        f"p11guard's Prometheus metrics need prometheus_client ({exc}): pip install 'p11guard[metrics]'"
    ) from exc

__all__ = [
    "CollectorRegistry",
    "CounterMetricFamily",
    "GaugeMetricFamily",
    "HistogramMetricFamily",
    "Metric",
    "start_http_server",
]
