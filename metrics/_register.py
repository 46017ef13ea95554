"""``register(guard, registry)``: a guard's metrics on a registry the caller owns."""

from __future__ import annotations

from typing import TYPE_CHECKING

from p11guard.metrics._collector import GuardCollector
from p11guard.metrics._observer import OpStats
from p11guard.metrics._prom import CollectorRegistry

if TYPE_CHECKING:
    from p11guard._guard import Guard

__all__ = ["GuardMetrics", "register"]


class GuardMetrics:
    """One guard's metrics on one registry (what :func:`register` returns).

    Attributes:
        guard: the guard.
        registry: the registry it is registered on.
        stats: the operation counts and latencies (plain numbers, read at scrape time).
    """

    def __init__(self, guard: Guard, registry: CollectorRegistry, collector: GuardCollector, stats: OpStats) -> None:
        self.guard = guard
        self.registry = registry
        self.collector = collector
        self.stats = stats

    def unregister(self) -> None:
        """Take the guard's metrics off the registry (the guard keeps counting, unseen)."""
        self.registry.unregister(self.collector)


def register(guard: Guard, registry: CollectorRegistry) -> GuardMetrics:
    """Export ``guard``'s metrics on ``registry`` (yours: p11guard never uses the global
    ``prometheus_client.REGISTRY`` on its own). One guard per registry.

    Raises:
        ValueError: ``registry`` already has a guard's (or any) metric of the same name.
    """
    stats = OpStats()
    collector = GuardCollector(guard, stats)
    try:
        registry.register(collector)
    except ValueError as exc:
        raise ValueError(
            f"this registry already has p11guard metrics ({exc}); give each guard a registry of its own "
            "(prometheus_client.CollectorRegistry())"
        ) from None
    try:
        guard.add_observer(stats)
    except BaseException:
        registry.unregister(collector)
        raise
    return GuardMetrics(guard, registry, collector, stats)
