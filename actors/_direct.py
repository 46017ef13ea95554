"""The direct path: a blocking caller runs its job on a free worker's host, on its own thread.

No thread hand-off: the supervisor lends the caller a free worker (a :class:`Ticket`,
booked as that worker's job, so nothing else uses the host meanwhile), the caller makes the
round trip itself -- with the call's deadline, so a hung module call costs only that caller
its wait, and the host is then broken and replaced -- and hands the outcome back exactly as
the worker would: a success under the supervisor's lock, a failure as a message for the
supervisor to decide (the caller then waits for that decision on its Future).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from p11guard.actors._messages import FastLane, Job, JobDone, Ticket
from p11guard.actors._pins import KeyPins, check_keys, repin

__all__ = ["run_direct"]


def run_direct(job: Job, ticket: Ticket, pins: KeyPins | None, lane: FastLane, tell: Callable[[Any], None]) -> None:
    """Run ``job`` on the lent host; its outcome goes where a worker's would."""
    try:
        check_keys(ticket.host, job, pins, ticket.call_s)
        result = ticket.host.call(job.op, job.args, ticket.call_s)
        repin(pins, job, result)
        done = JobDone(ticket.wid, ticket.generation, job, result=result)
        if lane.deliver(done):
            return
    except Exception as exc:
        done = JobDone(ticket.wid, ticket.generation, job, error=exc)
    tell(done)
