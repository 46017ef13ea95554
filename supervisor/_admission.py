"""Admission: who may enter, and the queue of accepted work waiting for a worker.

A plain class, no actor: the Guard asks :func:`refusal` before it accepts work (so a
refused caller never waits), and the supervisor asks it again when a job reaches it (the
state may have changed in between). One rule, one place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from p11guard.actors import Job
from p11guard.base import GuardClosed, GuardFailed, OutOfService, P11GuardError
from p11guard.supervisor._states import DISPATCHING, State

__all__ = ["AdmissionQueue", "refusal"]


def refusal(
    state: State, policy: str, op: str, *, closing: bool = False, failed_reason: str | None = None
) -> P11GuardError | None:
    """The error a new job gets at once, or ``None`` when it may wait for a worker.

    Closed (or closing) and failed guards refuse everything; with policy ``fail_fast`` a
    group that is not serving refuses with :class:`OutOfService`; with ``queue`` it waits.
    """
    if closing or state == State.CLOSED:
        return GuardClosed("the guard is closing; no new work is taken")
    if state == State.FAILED:
        return GuardFailed(failed_reason or "failed")
    if policy == "fail_fast" and state not in DISPATCHING:
        return OutOfService(str(state), op)
    return None


class AdmissionQueue:
    """Accepted jobs waiting for a worker, oldest first; a retried job goes to the front."""

    def __init__(self) -> None:
        self._jobs: deque[Job] = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def append(self, job: Job) -> None:
        self._jobs.append(job)

    def retry(self, job: Job) -> None:
        """A job back from a failed attempt: first in line, it has waited longest."""
        self._jobs.appendleft(job)

    def pop(self) -> Job:
        return self._jobs.popleft()

    def peek(self) -> Job:
        """The job :meth:`pop` would return, left in place."""
        return self._jobs[0]

    def expired(self, now: float) -> list[Job]:
        """Remove and return the jobs at the head whose deadline has passed."""
        out = []
        while self._jobs and now >= self._jobs[0].deadline:
            out.append(self._jobs.popleft())
        return out

    def drain(self) -> list[Job]:
        """Remove and return every job."""
        out = list(self._jobs)
        self._jobs.clear()
        return out
