"""The Prometheus collector of one guard: gauges and counters read from ``status()`` at
scrape time, operation counts and latencies from its :class:`~._observer.OpStats`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from p11guard.base import P11GuardError
from p11guard.metrics._observer import Histogram, OpStats
from p11guard.metrics._prom import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from p11guard._guard import Guard

__all__ = ["OUTAGE_BUCKETS", "GuardCollector"]

log = logging.getLogger("p11guard")

#: Upper bounds (seconds) of the outage and time-to-recover buckets.
OUTAGE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)

GROUP_STATES = ("STARTING", "SERVING", "SUSPECT", "LOST", "RECOVERING", "FAILED", "CLOSED")
MEMBER_STATES = ("starting", "serving", "suspect", "lost", "recovering", "out")
WORKER_STATES = ("starting", "idle", "busy", "suspect", "renewing", "stopping")


def _histogram(values: Iterable[float]) -> Histogram:
    h = Histogram(OUTAGE_BUCKETS)
    for value in values:
        h.observe(value)
    return h


def _add_histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    buckets, total = h.cumulative()
    family.add_metric(labels, buckets, total)


class GuardCollector:
    """Collects one guard's metrics (names in :data:`p11guard.metrics.METRICS`)."""

    def __init__(self, guard: Guard, stats: OpStats) -> None:
        self.guard = guard
        self.stats = stats

    def describe(self) -> Iterator[Metric]:
        """The metric names, without asking the guard (lets the registry spot a clash)."""
        yield from self._ops()
        yield from self._from_status({}, {})

    def collect(self) -> Iterator[Metric]:
        yield from self._ops()
        try:
            status, health = self.guard.status(), self.guard.health()
        except P11GuardError:  # a forked copy: nothing of the guard to report here
            return
        except Exception:  # a scrape must not fail: the operation counts still go out
            log.warning("p11guard metrics: the guard's status could not be read", exc_info=True)
            return
        yield from self._from_status(status, health)

    def _ops(self) -> Iterator[Metric]:
        ops = CounterMetricFamily(
            "p11guard_operations",
            "Operations ended, by op and outcome (a batch counts each item)",
            labels=["op", "outcome"],
        )
        for (op, outcome), count in sorted(list(self.stats.ops.items())):
            ops.add_metric([op, outcome], count)
        yield ops
        latency = HistogramMetricFamily(
            "p11guard_operation_duration_seconds",
            "Seconds from submission to outcome, by op (op=batch: one sign_many frame)",
            labels=["op"],
        )
        for op, h in sorted(dict(self.stats.latency).items()):
            _add_histogram(latency, [op], h)
        yield latency

    def _from_status(self, status: dict[str, Any], health: dict[str, Any]) -> Iterator[Metric]:
        state = status.get("state")
        counters: dict[str, int] = status.get("counters", {})
        members: list[dict[str, Any]] = status.get("members", [])
        g = GaugeMetricFamily("p11guard_state", "1 for the group's current state, 0 for the others", labels=["state"])
        for name in GROUP_STATES if status else ():
            g.add_metric([name], float(name == state))
        yield g
        yield self._gauge("p11guard_serving", "1 while the group serves (health 200), else 0", health, "serving")
        yield self._gauge(
            "p11guard_state_since_timestamp_seconds", "Unix time of the last state change", health, "since"
        )
        yield self._gauge(
            "p11guard_generation", "The group generation (one more per full recovery)", status, "generation"
        )
        yield self._gauge("p11guard_members", "Members of the group", health, "members_total")
        yield self._gauge("p11guard_members_serving", "Members serving now", health, "members_serving")
        yield self._gauge("p11guard_queue_depth", "Accepted operations waiting for a worker", status, "queued")
        yield self._gauge("p11guard_in_flight", "Operations on a worker now", status, "in_flight")
        ms = GaugeMetricFamily("p11guard_member_state", "1 for each member's current state", labels=["member", "state"])
        mg = GaugeMetricFamily("p11guard_member_generation", "Each member's generation", labels=["member"])
        ml = CounterMetricFamily("p11guard_member_losses", "Times each member was lost", labels=["member"])
        mr = CounterMetricFamily("p11guard_member_recoveries", "Times each member served again", labels=["member"])
        pt = GaugeMetricFamily(
            "p11guard_last_probe_timestamp_seconds", "Unix time of the last probe", labels=["member"]
        )
        pl = GaugeMetricFamily("p11guard_last_probe_latency_seconds", "Latency of the last probe", labels=["member"])
        po = GaugeMetricFamily("p11guard_last_probe_ok", "1 if the member's last probe succeeded", labels=["member"])
        mo = HistogramMetricFamily(
            "p11guard_member_outage_duration_seconds",
            "Each member's finished outages, loss to serving",
            labels=["member"],
        )
        for m in members:
            name = m["name"]
            for s in MEMBER_STATES:
                ms.add_metric([name, s], float(m["state"] == s))
            mg.add_metric([name], m["generation"])
            ml.add_metric([name], m["losses"])
            mr.add_metric([name], m["recoveries"])
            probe = m.get("last_probe")
            if probe:
                pt.add_metric([name], probe["at"])
                pl.add_metric([name], probe["latency_s"])
                po.add_metric([name], float(bool(probe["ok"])))
            _add_histogram(mo, [name], _histogram(o["duration_s"] for o in m["outages"] if o["end"] is not None))
        yield from (ms, mg, ml, mr, pt, pl, po, mo)
        w = GaugeMetricFamily("p11guard_workers", "Workers by status", labels=["status"])
        for s in WORKER_STATES if status else ():
            w.add_metric([s], sum(1 for x in status.get("workers", []) if x["status"] == s))
        yield w
        outages: list[dict[str, Any]] = status.get("outages", [])
        done = [o for o in outages if o["end"] is not None]
        yield self._counter("p11guard_group_losses", "Total losses of the whole group (outages begun)", len(outages))
        yield self._counter("p11guard_recoveries", "Full recoveries completed", counters.get("recoveries"))
        yield self._counter(
            "p11guard_host_restarts", "Host processes started to replace lost ones", counters.get("host_restarts")
        )
        yield self._counter("p11guard_login_failures", "Logins refused for the PIN", counters.get("login_failures"))
        yield self._counter(
            "p11guard_operations_retried", "Operations retried after a loss", counters.get("ops_retried")
        )
        probes = CounterMetricFamily("p11guard_probes", "Health probes, by outcome", labels=["outcome"])
        if counters:
            probes.add_metric(["ok"], counters["probes"] - counters["probes_failed"])
            probes.add_metric(["failed"], counters["probes_failed"])
        yield probes
        od = HistogramMetricFamily("p11guard_outage_duration_seconds", "Finished group outages, loss to serving")
        tr = HistogramMetricFamily(
            "p11guard_time_to_recover_seconds", "Finished group outages: from the HSM answering again to serving"
        )
        if status:
            _add_histogram(od, [], _histogram(o["duration_s"] for o in done))
            _add_histogram(tr, [], _histogram(o["recover_s"] for o in done if o.get("recover_s") is not None))
        yield from (od, tr)

    @staticmethod
    def _gauge(name: str, doc: str, source: dict[str, Any], key: str) -> GaugeMetricFamily:
        value = source.get(key)
        return GaugeMetricFamily(name, doc, value=None if value is None else float(value))

    @staticmethod
    def _counter(name: str, doc: str, value: int | None) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=value)
