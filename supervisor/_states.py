"""The supervisor's books: state enums and the records it keeps of members, workers, outages.

Plain data, no behaviour beyond small predicates: the decisions are in
:mod:`._supervisor` and :mod:`._recovery`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pykka

from p11guard.actors import Job
from p11guard.base import Config

__all__ = [
    "DISPATCHING",
    "FINAL",
    "OUTAGES_KEPT",
    "Counters",
    "Held",
    "InFlight",
    "Member",
    "MemberState",
    "Outage",
    "SharedState",
    "SlotState",
    "State",
    "WorkerSlot",
]


class State(StrEnum):
    """The group's state, as :attr:`Guard.state` shows it."""

    STARTING = "STARTING"
    SERVING = "SERVING"
    SUSPECT = "SUSPECT"
    LOST = "LOST"
    RECOVERING = "RECOVERING"
    FAILED = "FAILED"
    CLOSED = "CLOSED"

    def __str__(self) -> str:
        return self.value


class MemberState(StrEnum):
    """One member's state (``status()["members"][i]["state"]``).

    ``starting`` (first probe, then its workers), ``serving``, ``suspect`` (a worker
    reported a loss signal; probe pending), ``lost`` (re-probed with backoff),
    ``recovering`` (answers again; its workers start), ``out`` (kept out: wrong token or
    PIN -- never retried for the PIN).
    """

    STARTING = "starting"
    SERVING = "serving"
    SUSPECT = "suspect"
    LOST = "lost"
    RECOVERING = "recovering"
    OUT = "out"

    def __str__(self) -> str:
        return self.value


class SlotState(StrEnum):
    """One worker's state (``status()["workers"][i]["status"]``)."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    SUSPECT = "suspect"
    RENEWING = "renewing"
    STOPPING = "stopping"

    def __str__(self) -> str:
        return self.value


#: States in which work is dispatched to workers.
DISPATCHING = frozenset({State.SERVING, State.SUSPECT})
#: States nothing leaves.
FINAL = frozenset({State.FAILED, State.CLOSED})
#: Outages kept in the books (group and each member): the last ones; counters keep totals.
OUTAGES_KEPT = 100


class SharedState:
    """What the Guard reads without asking the actor: the state, since when and why."""

    def __init__(self) -> None:
        self.state = State.STARTING
        #: ``time.time()`` of the last state change, and its cause.
        self.since = time.time()
        self.cause: str | None = None
        #: The cause of the group outage in progress (LOST, RECOVERING), else ``None``.
        self.outage_cause: str | None = None
        self.failed_reason: str | None = None
        self.generation = 0
        self.recoveries = 0
        self.members_serving = 0
        self.members_total = 0


@dataclass
class WorkerSlot:
    """The supervisor's view of one worker of the current generation."""

    wid: int
    generation: int
    member: str = "default"
    ref: pykka.ActorRef[Any] | None = None
    status: SlotState = SlotState.STARTING
    pid: int | None = None
    #: The jobs on it now, by seq: one, or several single operations coalesced into a frame.
    jobs: dict[int, Job] = field(default_factory=dict)
    ops: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_kind: str | None = None
    sessions_opened: int = 0
    restarts: int = 0
    fail_streak: int = 0
    #: When its host loaded the module (:attr:`HostProcess.loaded_at`).
    host_loaded_at: float = 0.0

    @property
    def serving(self) -> bool:
        """It takes jobs: idle, or busy with some."""
        return self.status in (SlotState.IDLE, SlotState.BUSY)


@dataclass
class Outage:
    """One outage of the group or of a member: from its loss to serving again.

    ``recover_s`` is the part from the start of the first probe that found the HSM
    answering again until it served: p11guard's own time to recover (a new host, session
    and login, then the workers).
    """

    start: float
    start_mono: float
    cause: str
    generation: int
    end: float | None = None
    duration_s: float | None = None
    answered_mono: float | None = None
    recover_s: float | None = None

    @classmethod
    def begin(cls, cause: str, generation: int) -> Outage:
        return cls(time.time(), time.monotonic(), cause, generation)

    def answered(self, probe_started: float) -> None:
        """A probe that began at ``probe_started`` (monotonic) found the HSM answering
        again: recovery work (host, session, login) counts from there. The first counts."""
        if self.answered_mono is None:
            self.answered_mono = probe_started or time.monotonic()

    def finish(self) -> None:
        now = time.monotonic()
        self.end = time.time()
        self.duration_s = round(now - self.start_mono, 3)
        if self.answered_mono is not None:
            self.recover_s = round(now - self.answered_mono, 3)


@dataclass
class Held:
    """A job that met a loss signal on a member in service, waiting for the probe's verdict.

    ``outcome`` is what the caller gets if the verdict says the error was the job's own
    (and it already had its one retry): the exception, or a batch's per-item results.
    """

    job: Job
    outcome: Any
    at: float = field(default_factory=time.monotonic)
    #: When the host that answered it loaded the module: a probe whose own host is younger
    #: says nothing about it (a device restarted between the two breaks only the older one).
    host_loaded_at: float = 0.0


class Member:
    """The supervisor's view of one member of the group (``LunaHAStatus`` has one per member)."""

    IN_SERVICE = frozenset({MemberState.STARTING, MemberState.SERVING, MemberState.SUSPECT, MemberState.RECOVERING})

    def __init__(self, name: str, config: Config, workers: int) -> None:
        self.name = name
        self.config = config
        self.workers = workers
        self.health: pykka.ActorRef[Any] | None = None
        self.state = MemberState.STARTING
        self.generation = 0
        self.attempt = 0
        self.reason: str | None = None
        self.outage: Outage | None = None
        self.outages: deque[Outage] = deque(maxlen=OUTAGES_KEPT)
        self.losses = 0
        self.recoveries = 0
        self.last_probe: dict[str, Any] | None = None
        self.held: list[Held] = []
        #: One of its workers has served: from now on a start failure is a loss, not a
        #: configuration error (a PIN error still never is).
        self.served = False
        #: The member generation in which the probe last logged in with the PIN.
        self.pin_proven = -1
        #: The token met at first contact (label, serial, manufacturer, model); every later
        #: probe and worker login must meet the same one.
        self.identity: dict[str, Any] | None = None
        #: The mechanisms its workers' sessions negotiated (name -> choice), from the last one.
        self.mechanisms: dict[str, Any] = {}

    @property
    def in_service(self) -> bool:
        return self.state in self.IN_SERVICE

    def __repr__(self) -> str:
        return f"<Member {self.name} {self.state} generation={self.generation}>"


@dataclass
class Counters:
    ops_ok: int = 0
    ops_failed: int = 0
    ops_retried: int = 0
    outcome_unknown: int = 0
    recoveries: int = 0
    probes: int = 0
    probes_failed: int = 0
    login_failures: int = 0
    member_losses: int = 0
    member_recoveries: int = 0
    coalesced: int = 0  # single operations that shared a frame with another
    direct: int = 0  # blocking operations run on a free worker's host by the caller's thread
    #: Hosts started to replace lost ones (worker renewals, members and groups back).
    host_restarts: int = 0


@dataclass
class InFlight:
    """A job on a worker: which worker, of which generation, since when."""

    generation: int
    wid: int
    job: Job
    since: float = field(default_factory=time.monotonic)
