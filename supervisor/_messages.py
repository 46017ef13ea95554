"""Messages only the supervisor handles (the actors' messages are in :mod:`p11guard.actors`)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from p11guard.actors import Job

__all__ = [
    "AddCallback",
    "AddObserver",
    "Close",
    "Finalize",
    "InjectFault",
    "MemberAttempt",
    "RenewAttempt",
    "StatusRequest",
    "Submit",
    "SupervisorTick",
]


@dataclass(frozen=True)
class Submit:
    """A job for the queue (when the FastLane is not connected)."""

    job: Job


@dataclass(frozen=True)
class Close:
    """Take no more work; complete ``future`` once the queue and in-flight work are done."""

    future: Future[None]


@dataclass(frozen=True)
class Finalize:
    """Fail what is left, stop every actor (politely within ``deadline_s`` if serving)."""

    deadline_s: float


@dataclass(frozen=True)
class StatusRequest:
    pass


@dataclass(frozen=True)
class InjectFault:
    wid: int
    args: dict[str, Any]
    future: Future[Any]


@dataclass(frozen=True)
class AddCallback:
    callback: Callable[[str, str, dict[str, Any]], None]


@dataclass(frozen=True)
class AddObserver:
    """Tell ``observer(job, result, error)`` of every job as it ends."""

    observer: Callable[[Job, Any, BaseException | None], None]


@dataclass(frozen=True)
class MemberAttempt:
    """Time to re-probe a lost member (of this member generation)."""

    member: str
    generation: int


@dataclass(frozen=True)
class RenewAttempt:
    """Time to renew a worker (after a backoff)."""

    wid: int
    generation: int


@dataclass(frozen=True)
class SupervisorTick:
    """The clock: deadlines, idle host deaths, periodic probes."""
