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

__all__ = ["AdmissionQueue", "frame_share", "refusal"]


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


def frame_share(work: int, serving: int, batch_size: int) -> int:
    """How many single operations one frame may take: its worker's share of the work
    (waiting and in flight) over the workers that serve, at most ``batch_size``.

    Not all that waits: with 256 in flight on 16 workers of a latency-bound HSM, frames of
    ``batch_size`` (64) kept 4 hosts busy and 12 idle -- 3,509 frames of one op in 4 s.
    """
    return max(1, min(batch_size, -(-work // max(serving, 1))))


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

    def coalescable(self, limit: int, free: int) -> list[Job]:
        """Remove and return up to ``limit`` single idempotent operations from the head,
        while more wait than ``free`` workers can take at once."""
        out: list[Job] = []
        while self._jobs and len(self._jobs) > free and len(out) < limit:
            head = self._jobs[0]
            if head.items is not None or not head.idempotent:
                break  # batches and token-changing operations go in frames of their own
            out.append(self._jobs.popleft())
        return out

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
