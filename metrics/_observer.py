"""The job observer: operation counts and latencies, kept as plain numbers.

:class:`OpStats` is what a guard's supervisor calls as every job ends (under its lock, on
the hot path), so it does the least it can: a dict increment and a bucket increment, no
locks, no prometheus_client. The collector reads the numbers when Prometheus scrapes.
Imports nothing heavy: stdlib and :mod:`p11guard.base`.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Protocol

from p11guard.base import (
    AuthError,
    GuardClosed,
    GuardFailed,
    GuardForked,
    HostError,
    OpTimeout,
    OutcomeUnknown,
    OutOfService,
    RemoteError,
    UserError,
)

__all__ = ["LATENCY_BUCKETS", "OUTCOMES", "Histogram", "JobView", "OpStats", "outcome_of"]

#: Upper bounds (seconds) of the operation latency buckets: a local token answers in
#: well under a millisecond, an operation queued through an outage in tens of seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Every ``outcome`` label value, and the exception each stands for.
OUTCOMES: dict[str, str] = {
    "ok": "a result",
    "user_error": "the request was wrong (UserError: key not found, bad mechanism or data)",
    "auth_error": "login refused for the PIN (AuthError)",
    "hsm_error": "the module or host failed and retrying did not help (RemoteError, HostError)",
    "out_of_service": "refused while the group was not serving, policy fail_fast (OutOfService)",
    "timeout": "not done within op_deadline_s (OpTimeout)",
    "outcome_unknown": "token-changing work in flight at a loss (OutcomeUnknown)",
    "failed": "the guard failed (GuardFailed)",
    "closed": "the guard closed (GuardClosed, GuardForked)",
    "error": "anything else",
}

_ORDER: tuple[tuple[type[BaseException], str], ...] = (
    (OutOfService, "out_of_service"),
    (OpTimeout, "timeout"),
    (OutcomeUnknown, "outcome_unknown"),
    (GuardFailed, "failed"),
    (GuardClosed, "closed"),
    (GuardForked, "closed"),
    (AuthError, "auth_error"),
    (UserError, "user_error"),
    (RemoteError, "hsm_error"),
    (HostError, "hsm_error"),
)
_BY_TYPE: dict[type[BaseException], str] = {}


def outcome_of(error: BaseException | None) -> str:
    """The ``outcome`` label of an operation that ended with ``error`` (``None``: ``ok``)."""
    if error is None:
        return "ok"
    kind = type(error)
    found = _BY_TYPE.get(kind)
    if found is None:
        found = next((name for cls, name in _ORDER if isinstance(error, cls)), "error")
        _BY_TYPE[kind] = found
    return found


class JobView(Protocol):
    """What the observer reads of a job (:class:`p11guard.actors.Job` has it)."""

    @property
    def op(self) -> str: ...

    @property
    def items(self) -> list[tuple[str, dict[str, Any]]] | None: ...

    @property
    def submitted(self) -> float: ...


class Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """``([(le, count <= le), ..., ("+Inf", total)], sum)`` as Prometheus wants them."""
        counts, total = list(self.counts), self.sum  # one consistent copy
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
        return out, total


class OpStats:
    """The observer: ``stats(job, result, error)`` as each job ends.

    ``ops[(op, outcome)]`` counts operations (a batch counts each item by its own op and
    outcome); ``latency[op]`` times each job from submission to its end (a batch frame is
    one observation under ``op="batch"``). Refused operations are counted and timed too.
    """

    def __init__(self) -> None:
        self.ops: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Histogram] = {}

    def __call__(self, job: JobView, result: Any, error: BaseException | None) -> None:
        ops = self.ops
        items = job.items
        if items:
            if error is None and isinstance(result, list):
                for (op, _), item in zip(items, result, strict=False):
                    key = (op, outcome_of(item if isinstance(item, BaseException) else None))
                    ops[key] = ops.get(key, 0) + 1
            else:
                outcome = outcome_of(error)
                for op, _ in items:
                    ops[(op, outcome)] = ops.get((op, outcome), 0) + 1
            name = "batch"
        else:
            name = job.op
            key = (name, outcome_of(error))
            ops[key] = ops.get(key, 0) + 1
        if job.submitted:
            histogram = self.latency.get(name)
            if histogram is None:
                histogram = self.latency[name] = Histogram()
            histogram.observe(time.monotonic() - job.submitted)
