"""The Supervisor actor: state machine, admission, single-flight recovery, worker lifecycle.

States: STARTING -> SERVING <-> SUSPECT -> LOST -> RECOVERING -> SERVING; FAILED and
CLOSED are final. One actor owns every decision, so one recovery runs at a time whatever
the number of reports: messages are handled one by one, and anything that carries an
older generation can only settle its own job, never change the state.

A group is a list of members (a group that lists none is one member). Each member has a
HealthActor, workers of its own and a generation of its own: a member that is lost while
others serve is taken out (its hosts killed, its idempotent work retried elsewhere) and
re-probed in the background -- what an HA client library does. Only the loss of every
member is a loss of the group: the full recovery, with a new group generation.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pykka

from p11guard.actors import (
    CryptoWorker,
    FastLane,
    HealthActor,
    HostRegistry,
    Inject,
    Job,
    JobDone,
    ProbeResult,
    Renew,
    Report,
    RunJob,
    Shutdown,
    StartProbe,
    Tick,
    WorkerFailed,
    WorkerReady,
    WorkerStopped,
)
from p11guard.base import (
    AuthError,
    Config,
    ConfigError,
    GuardClosed,
    GuardFailed,
    HostCrashed,
    HostError,
    ModuleLoadError,
    OpTimeout,
    OutcomeUnknown,
    OutOfService,
    RemoteError,
    Secret,
)
from p11guard.host import HostProcess
from p11guard.protocol import LOSS_KINDS

__all__ = ["SharedState", "State", "Supervisor"]

log = logging.getLogger("p11guard")


class State(StrEnum):
    """The supervisor's states (see ``../shared/design.md``)."""

    STARTING = "STARTING"
    SERVING = "SERVING"
    SUSPECT = "SUSPECT"
    LOST = "LOST"
    RECOVERING = "RECOVERING"
    FAILED = "FAILED"
    CLOSED = "CLOSED"

    def __str__(self) -> str:
        return self.value


#: Runs of one job that may end in a loss signal before its last error is its answer.
MAX_ATTEMPTS = 8

#: States in which work is dispatched to workers.
_DISPATCHING = (State.SERVING, State.SUSPECT)


class SharedState:
    """What the Guard reads without asking the actor: the state and why it failed."""

    def __init__(self) -> None:
        self.state = State.STARTING
        self.failed_reason: str | None = None
        self.generation = 0
        self.recoveries = 0
        self.members_serving = 0
        self.members_total = 0


# -- messages only the supervisor handles ----------------------------------------------------


@dataclass(frozen=True)
class Submit:
    job: Job


@dataclass(frozen=True)
class Close:
    future: Future[None]


@dataclass(frozen=True)
class Finalize:
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
class RecoveryAttempt:
    generation: int


@dataclass(frozen=True)
class MemberAttempt:
    """Time to re-probe a lost member (of this member generation)."""

    member: str
    generation: int


@dataclass(frozen=True)
class RenewAttempt:
    wid: int
    generation: int


@dataclass(frozen=True)
class SupervisorTick:
    pass


@dataclass
class WorkerSlot:
    """The supervisor's view of one worker of the current generation."""

    wid: int
    generation: int
    member: str = "default"
    ref: pykka.ActorRef[Any] | None = None
    status: str = "starting"  # starting | idle | busy | suspect | renewing | stopping
    pid: int | None = None
    job: Job | None = None
    ops: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_kind: str | None = None
    sessions_opened: int = 0
    restarts: int = 0
    fail_streak: int = 0


@dataclass
class Outage:
    start: float
    start_mono: float
    cause: str
    generation: int
    end: float | None = None
    duration_s: float | None = None


class Member:
    """The supervisor's view of one member of the group (``LunaHAStatus`` has one per member).

    ``state``: ``starting`` (first probe, then its workers), ``serving``, ``suspect`` (a
    worker reported a loss signal; probe pending), ``lost`` (re-probed with backoff),
    ``recovering`` (answers again; its workers start), ``out`` (kept out: wrong token label
    or PIN -- never retried for the PIN).
    """

    IN_SERVICE = ("starting", "serving", "suspect", "recovering")

    def __init__(self, name: str, config: Config, workers: int) -> None:
        self.name = name
        self.config = config
        self.workers = workers
        self.health: pykka.ActorRef[Any] | None = None
        self.state = "starting"
        self.generation = 0
        self.attempt = 0
        self.reason: str | None = None
        self.outage: Outage | None = None
        self.outages: list[Outage] = []
        self.losses = 0
        self.recoveries = 0
        self.last_probe: dict[str, Any] | None = None

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


def _is_loss(error: BaseException) -> bool:
    """A loss signal: the worker is suspect and the group must be probed."""
    if isinstance(error, HostError):
        return True
    return isinstance(error, RemoteError) and error.kind in LOSS_KINDS


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass
class _InFlight:
    generation: int
    wid: int
    job: Job
    since: float = field(default_factory=time.monotonic)


class Supervisor(pykka.ThreadingActor):
    """Owns the members, their workers and health actors, the queue and every state change."""

    def __init__(
        self,
        config: Config,
        registry: HostRegistry,
        started: Future[None],
        shared: SharedState,
        lane: FastLane | None = None,
    ) -> None:
        super().__init__()
        self.lane = lane or FastLane()
        self.config = config
        self.registry = registry
        self.started = started
        self.shared = shared
        self.state = State.STARTING
        self.generation = 0
        self.members: dict[str, Member] = {}
        named = config.member_configs()
        # Every member gets at least one worker; the rest are dealt round-robin.
        total = max(config.workers, len(named))
        for i, (name, member_config) in enumerate(named):
            self.members[name] = Member(name, member_config, total // len(named) + (i < total % len(named)))
        self.slots: dict[int, WorkerSlot] = {}
        self.idle: deque[int] = deque()
        self.queue: deque[Job] = deque()
        self.inflight: dict[int, _InFlight] = {}
        self.outages: list[Outage] = []
        self.outage: Outage | None = None
        self.counters = Counters()
        self.last_probe: dict[str, Any] | None = None
        self.callbacks: list[Callable[[str, str, dict[str, Any]], None]] = []
        self.failed_reason: str | None = None
        self.closing = False
        self.close_future: Future[None] | None = None
        self._next_wid = 0
        self._timers: list[threading.Timer] = []
        self._last_tick_probe = time.monotonic()
        self._pin: Secret | None = None
        self._start_error: BaseException | None = None

    # -- life cycle ---------------------------------------------------------------------

    def on_start(self) -> None:
        self.lane.connect(self._on_submit, self._on_job_done)
        single = len(self.members) == 1 and not self.config.members
        for member in self.members.values():
            member.health = HealthActor.start(
                member.config,
                self.actor_ref,
                self.registry,
                lambda m=member: m.generation,
                member=member.name,
                key="probe" if single else f"probe-{member.name}",
            )
        if self._load_pin():
            for member in self.members.values():
                self._prestart(member)
                self._probe_member(member)

    def on_stop(self) -> None:
        self.lane.disconnect()
        for timer in self._timers:
            timer.cancel()
        for member in self.members.values():
            if member.health is not None and member.health.is_alive():
                member.health.stop(block=False)

    def _load_pin(self) -> bool:
        try:
            self._pin = self.config.load_pin()
        except ConfigError as exc:
            self._fail(str(exc), exc)
            return False
        return True

    def _after(self, delay: float, message: Any) -> None:
        ref = self.actor_ref
        timer = threading.Timer(delay, lambda: ref.tell(message) if ref.is_alive() else None)
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()]
        self._timers.append(timer)
        timer.start()

    def _backoff(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (1, 2, ...): exponential, capped, with jitter."""
        delay: float = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2.0 ** max(attempt - 1, 0))
        return delay * random.uniform(0.5, 1.0)  # jitter: many clients must not retry in step

    def _set_state(self, new: State, cause: str | None = None) -> None:
        old = self.state
        if old == new:
            return
        self.state = new
        self.shared.state = new
        self.shared.generation = self.generation
        level = logging.WARNING if new in (State.SUSPECT, State.LOST, State.FAILED) else logging.INFO
        log.log(
            level,
            "state %s -> %s (generation %d)%s",
            old,
            new,
            self.generation,
            f": {cause}" if cause else "",
        )
        info = {"generation": self.generation, "cause": cause}
        for callback in list(self.callbacks):
            try:
                callback(str(old), str(new), info)
            except Exception:
                log.exception("state-change callback failed")

    def _refresh(self, cause: str) -> None:
        """SERVING while some member serves, SUSPECT while none does but some is in service."""
        if self.state not in _DISPATCHING:
            return
        if any(m.state == "serving" for m in self.members.values()):
            self._set_state(State.SERVING, cause)
        else:
            self._set_state(State.SUSPECT, cause)

    # -- messages -----------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        # The lock is the actor's own serialisation, shared with the FastLane callers.
        with self.lane.lock:
            try:
                return self._handle(message)
            finally:
                self.shared.members_serving = sum(m.state == "serving" for m in self.members.values())
                self.shared.members_total = len(self.members)

    def _handle(self, message: Any) -> Any:
        if isinstance(message, Submit):
            self._on_submit(message.job)
        elif isinstance(message, JobDone):
            self._on_job_done(message)
        elif isinstance(message, SupervisorTick):
            self._on_tick()
        elif isinstance(message, WorkerReady):
            self._on_worker_ready(message)
        elif isinstance(message, WorkerFailed):
            self._on_worker_failed(message)
        elif isinstance(message, WorkerStopped):
            self._on_worker_stopped(message)
        elif isinstance(message, ProbeResult):
            self._on_probe(message)
        elif isinstance(message, MemberAttempt):
            member = self.members.get(message.member)
            if (
                member is not None
                and member.state in ("lost", "starting")
                and member.generation == message.generation
                and self.state not in (State.FAILED, State.CLOSED)
            ):
                self._reprobe(member)
        elif isinstance(message, RenewAttempt):
            self._renew(message.wid, message.generation)
        elif isinstance(message, StatusRequest):
            return self._status()
        elif isinstance(message, InjectFault):
            self._on_inject(message)
        elif isinstance(message, AddCallback):
            self.callbacks.append(message.callback)
        elif isinstance(message, Close):
            self._on_close(message.future)
        elif isinstance(message, Finalize):
            return self._on_finalize(message.deadline_s)
        return None

    # -- admission and dispatch ---------------------------------------------------------

    def _on_submit(self, job: Job) -> None:
        if self.closing or self.state == State.CLOSED:
            self._settle(job, error=GuardClosed("the guard is closing; no new work is taken"))
        elif self.state == State.FAILED:
            self._settle(job, error=GuardFailed(self.failed_reason or "failed"))
        elif self.config.policy == "fail_fast" and self.state not in _DISPATCHING:
            self._settle(job, error=OutOfService(str(self.state), job.op))
        else:
            self.queue.append(job)
            self._dispatch()

    def _dispatch(self) -> None:
        if self.state not in _DISPATCHING:
            return
        now = time.monotonic()
        while self.queue and self.idle:
            wid = self.idle.popleft()
            slot = self.slots.get(wid)
            if slot is None or slot.status != "idle" or slot.ref is None:
                continue
            job = self.queue.popleft()
            if now >= job.deadline:
                self._expire(job)
                self.idle.appendleft(wid)
                continue
            slot.status, slot.job = "busy", job
            job.attempts += 1
            self.inflight[job.seq] = _InFlight(self.generation, wid, job)
            slot.ref.tell(RunJob(job))

    def _settle(self, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        if job.future.done():
            return
        if error is None:
            job.future.set_result(result)
            self.counters.ops_ok += len(job.items) if job.items else 1
        else:
            job.future.set_exception(error)
            self.counters.ops_failed += len(job.items) if job.items else 1
            if isinstance(error, OutcomeUnknown):
                self.counters.outcome_unknown += 1

    def _expire(self, job: Job) -> None:
        self._settle(job, error=OpTimeout(job.name, self.config.op_deadline_s, str(self.state), job.last_error))

    def _lost_in_flight(self, job: Job, error: BaseException) -> None:
        """A job whose worker hit a loss signal (or was killed under it)."""
        if self.state == State.FAILED:
            self._settle(job, error=GuardFailed(self.failed_reason or "failed"))
        elif self.closing:
            self._settle(job, error=GuardClosed(f"the guard closed while {job.name} was in flight ({_short(error)})"))
        elif not job.idempotent:
            self._settle(job, error=OutcomeUnknown(job.op, job.label, f"a loss signal arrived ({_short(error)})"))
        elif time.monotonic() >= job.deadline:
            job.last_error = _short(error)
            self._expire(job)
        elif job.attempts >= MAX_ATTEMPTS:
            # A request that fails every host it meets (a module bug on that input, say)
            # must not churn hosts until its deadline.
            self._settle(job, error=error)
        elif self.config.policy == "fail_fast" and self.state not in _DISPATCHING:
            self._settle(job, error=OutOfService(str(self.state), job.op))
        else:
            job.last_error = _short(error)
            self.counters.ops_retried += len(job.items) if job.items else 1
            self.queue.appendleft(job)  # oldest first: it has waited longest

    def _on_job_done(self, msg: JobDone) -> None:
        entry = self.inflight.pop(msg.job.seq, None)
        slot = self.slots.get(msg.wid)
        current = (
            entry is not None
            and msg.generation == self.generation
            and slot is not None
            and slot.generation == msg.generation
            and slot.job is msg.job
        )
        if current:
            assert slot is not None
            slot.job = None
            slot.ops += len(msg.job.items) if msg.job.items else 1
        if msg.error is None:
            self._settle(msg.job, result=msg.result)
            if current:
                assert slot is not None
                slot.status = "idle"
                slot.fail_streak = 0
                self.idle.append(slot.wid)
        elif not _is_loss(msg.error):
            self._settle(msg.job, error=msg.error)
            if current:
                assert slot is not None
                slot.status = "idle"
                self.idle.append(slot.wid)
        else:
            self._lost_in_flight(msg.job, msg.error)
            if current:
                assert slot is not None
                self._suspect(slot, msg.error)
        self._dispatch()
        self._maybe_closed()

    def _on_tick(self) -> None:
        now = time.monotonic()
        while self.queue and now >= self.queue[0].deadline:
            self._expire(self.queue.popleft())
        if self.state in _DISPATCHING:
            # An idle worker's host that died (killed, OOM...) is noticed now, not by the
            # next job that would meet it.
            for slot in list(self.slots.values()):
                host = self.registry.get(f"worker-{slot.wid}")
                if slot.status == "idle" and (host is None or not host.alive):
                    crash = HostCrashed(
                        f"idle host exited with {host.exitcode if host else None}",
                        pid=slot.pid,
                        generation=self.generation,
                    )
                    self._suspect(slot, crash)
        if self.state in _DISPATCHING and now - self._last_tick_probe >= self.config.probe_interval_s:
            self._last_tick_probe = now
            for member in self.members.values():
                if member.health is not None and member.state in ("serving", "suspect"):
                    member.health.tell(Tick(member.generation))

    # -- workers ------------------------------------------------------------------------

    def _start_workers(self, member: Member, given: HostProcess | None = None) -> None:
        """Start the member's workers; the first takes ``given`` (a logged-in probe host)."""
        assert self._pin is not None
        for _ in range(member.workers):
            wid, self._next_wid = self._next_wid, self._next_wid + 1
            slot = WorkerSlot(wid, self.generation, member.name)
            self.slots[wid] = slot
            slot.ref = CryptoWorker.start(
                wid, self.generation, member.config, self._pin, self.actor_ref, self.registry, self.lane, given
            )
            given = None

    def _member_slots(self, member: Member) -> list[WorkerSlot]:
        return [s for s in self.slots.values() if s.member == member.name]

    def _on_worker_ready(self, msg: WorkerReady) -> None:
        slot = self.slots.get(msg.wid)
        if msg.generation != self.generation or slot is None or self.state in (State.FAILED, State.CLOSED):
            return
        slot.status, slot.pid, slot.sessions_opened = "idle", msg.pid, msg.sessions_opened
        self.idle.append(msg.wid)
        member = self.members[slot.member]
        if member.state in ("starting", "recovering"):
            member.state, member.reason, member.attempt = "serving", None, 0
            self._end_member_outage(member)
        if self.state == State.RECOVERING:
            self._end_outage()
            self._set_state(State.SERVING, f"worker {msg.wid} serves generation {self.generation} on {member.name}")
        elif self.state == State.STARTING:
            self._set_state(State.SERVING, f"worker {msg.wid} ready")
        else:
            self._refresh(f"member {member.name} serves")
        self._check_started()
        self._dispatch()

    def _check_started(self) -> None:
        if self.started.done():
            return
        if any(s.status in ("starting",) for s in self.slots.values()):
            return
        if any(s.status == "idle" or s.status == "busy" for s in self.slots.values()):
            self.started.set_result(None)

    def _on_worker_failed(self, msg: WorkerFailed) -> None:
        slot = self.slots.get(msg.wid)
        if msg.generation != self.generation or slot is None or self.state in (State.FAILED, State.CLOSED):
            return
        member = self.members[slot.member]
        if self._keeps_out(msg.error):
            self._keep_out(member, f"worker {msg.wid} could not log in: {msg.error}", msg.error)
            return
        if (
            self.state == State.STARTING
            and all(s.status == "suspect" or s is slot for s in self.slots.values())
            and not any(m.state == "starting" and not self._member_slots(m) for m in self.members.values())
        ):
            self._fail(f"no worker could start: {msg.error}", msg.error)
            return
        self._suspect(slot, msg.error)

    def _suspect(self, slot: WorkerSlot, error: BaseException) -> None:
        slot.fail_streak += 1  # reset by a job that succeeds: renewals back off until then
        slot.status = "suspect"
        slot.errors += 1
        slot.last_error = _short(error)
        slot.last_error_kind = error.kind if isinstance(error, RemoteError) else "host"
        member = self.members[slot.member]
        log.warning(
            "worker %d (pid %s, member %s) reports a loss signal: %s", slot.wid, slot.pid, member.name, slot.last_error
        )
        self._check_started()
        if member.health is not None:
            member.health.tell(Report(slot.wid, member.generation, slot.last_error))
        if member.state == "serving":
            member.state = "suspect"
            self._refresh(f"worker {slot.wid}: {slot.last_error}")

    def _renew(self, wid: int, generation: int) -> None:
        slot = self.slots.get(wid)
        if generation != self.generation or slot is None or slot.status != "renewing":
            return
        assert self._pin is not None
        slot.restarts += 1
        if slot.ref is not None and slot.ref.is_alive():
            # A session error with a live host: a new session is enough. Else a new host.
            slot.ref.tell(Renew(self._pin, new_host=slot.last_error_kind != "session"))
        else:
            slot.status = "starting"
            slot.ref = CryptoWorker.start(
                wid,
                self.generation,
                self.members[slot.member].config,
                self._pin,
                self.actor_ref,
                self.registry,
                self.lane,
            )

    def _on_worker_stopped(self, msg: WorkerStopped) -> None:
        for seq, entry in list(self.inflight.items()):
            if entry.generation == msg.generation and entry.wid == msg.wid:
                del self.inflight[seq]
                self._lost_in_flight(
                    entry.job, HostError("worker stopped with the job in flight", generation=msg.generation)
                )
        slot = self.slots.get(msg.wid)
        if (
            slot is not None
            and msg.generation == self.generation
            and slot.status != "stopping"
            and self.state not in (State.FAILED, State.CLOSED)
        ):
            # The worker actor died on its own (a bug, or on_start raised): one_for_one.
            slot.ref = None
            slot.status = "suspect"
            slot.last_error_kind = "host"
            self._schedule_renew(slot)
        self._dispatch()
        self._maybe_closed()

    def _schedule_renew(self, slot: WorkerSlot) -> None:
        slot.status = "renewing"
        delay = 0.0
        if slot.fail_streak > 1:
            delay = self._backoff(slot.fail_streak - 1)
        if delay:
            self._after(delay, RenewAttempt(slot.wid, self.generation))
        else:
            self._renew(slot.wid, self.generation)

    def _stop_slots(self, slots: list[WorkerSlot], forget: bool = True) -> None:
        """Kill the hosts first (a blocked call then fails at once), then stop the actors.

        Forgotten slots are gone from the books: whatever their actors still send can only
        settle its own job (worker ids are never reused within a group generation).
        """
        self.registry.kill(h for h in (self.registry.get(f"worker-{s.wid}") for s in slots) if h is not None)
        for slot in slots:
            slot.status = "stopping"
            if slot.ref is not None:
                slot.ref.stop(block=False)
            if forget:
                self.slots.pop(slot.wid, None)
        stopped = {s.wid for s in slots}
        self.idle = deque(wid for wid in self.idle if wid not in stopped)

    def _on_inject(self, msg: InjectFault) -> None:
        slot = self.slots.get(msg.wid)
        if slot is None or slot.ref is None:
            msg.future.set_exception(ValueError(f"no worker {msg.wid} (workers: {sorted(self.slots)})"))
            return
        slot.ref.tell(Inject(msg.args, msg.future))

    # -- health: probes, members ----------------------------------------------------------

    def _keeps_out(self, error: BaseException | None) -> bool:
        """A verdict that retrying cannot change: wrong PIN, unloadable module, and -- for a
        member of a listed group -- a module that answers without the group's token."""
        if isinstance(error, AuthError | ModuleLoadError):
            return True
        return bool(self.config.members) and isinstance(error, RemoteError) and error.name == "token_label_unknown"

    def _prestart(self, member: Member) -> None:
        """Spare hosts for the member's next probe and workers boot now, from this thread
        (which outlives them), so that its recovery does not wait for Python to start."""
        self.registry.prestart(member.config.module_env, member.workers + 2)

    def _probe_member(self, member: Member) -> None:
        assert self._pin is not None and member.health is not None
        handover = member.state == "lost"  # a member coming back: its probe host becomes a worker
        member.health.tell(StartProbe(member.generation, self._pin, self.generation, handover))

    def _reprobe(self, member: Member) -> None:
        # The PIN is read again: it may have changed during the outage. A wrong one fails
        # the probe's single login and the member is kept out -- never a retry loop on the PIN.
        if self._load_pin():
            self._probe_member(member)

    def _on_probe(self, res: ProbeResult) -> None:
        member = self.members.get(res.member)
        if member is None or res.generation != member.generation or self.state in (State.FAILED, State.CLOSED):
            if res.host is not None:
                res.host.kill()  # a handed-over host nobody takes
            return
        self.counters.probes += 1
        if not res.ok:
            self.counters.probes_failed += 1
        member.last_probe = {
            "ok": res.ok,
            "at": res.at,
            "latency_s": round(res.latency_s, 6),
            "error": None if res.error is None else _short(res.error),
        }
        self.last_probe = {**member.last_probe, "member": member.name}
        if res.ok and res.fresh:
            if member.state in ("starting", "lost"):
                if member.state == "lost":
                    member.state = "recovering"
                    log.info(
                        "member %s answers again (generation %d, probe %.3f s); starting its workers",
                        member.name,
                        member.generation,
                        res.latency_s,
                    )
                self._start_workers(member, res.host)
            elif res.host is not None:
                res.host.kill()
        elif self._keeps_out(res.error):
            assert res.error is not None
            self._keep_out(member, str(res.error), res.error)
        elif res.ok or (not res.fresh and not _is_loss(res.error or Exception())):
            # A non-loss error (SoftHSM2's odd CKR_GENERAL_ERROR while another process logs
            # in) is an answer too: the member is there.
            if member.state == "suspect":
                member.state = "serving"
                self._refresh(f"probe of {member.name} OK: false alarm")
            for slot in self._member_slots(member):
                if slot.status == "suspect":
                    log.info("probe OK: renewing worker %d only (one_for_one)", slot.wid)
                    self._schedule_renew(slot)
        elif res.fresh and (
            member.state == "lost"
            or (member.state == "starting" and not _is_loss(res.error or Exception()) and member.attempt < 3)
        ):
            member.attempt += 1
            delay = self._backoff(member.attempt)
            log.debug("probe %d of %s failed (%s); next in %.3f s", member.attempt, member.name, res.error, delay)
            self._prestart(member)
            self._after(delay, MemberAttempt(member.name, member.generation))
        else:
            cause = res.cause or ("start" if res.fresh else "periodic")
            self._lose_member(
                member, f"probe of {member.name} failed ({cause}): {_short(res.error or Exception())}", res.error
            )

    def _keep_out(self, member: Member, reason: str, error: BaseException) -> None:
        if member.state == "out":
            return
        member.state, member.reason = "out", reason
        self._stop_slots(self._member_slots(member))
        log.error("member %s kept out: %s", member.name, reason)
        if all(m.state == "out" for m in self.members.values()):
            self._fail(
                reason if len(self.members) == 1 else f"every member is kept out; {member.name}: {reason}", error
            )
            return
        if isinstance(error, AuthError):
            self.counters.login_failures += 1
        self._after_member_change(member, reason, error)

    def _lose_member(self, member: Member, cause: str, error: BaseException | None) -> None:
        """A member's probe failed: take it out and re-probe it, or lose the group."""
        if not member.in_service:
            return
        others = [m for m in self.members.values() if m is not member and m.in_service]
        if self.state in _DISPATCHING and not others:
            self._begin_recovery(cause)
            return
        member.state, member.reason = "lost", cause
        member.generation += 1
        member.attempt = 0
        member.losses += 1
        self.counters.member_losses += 1
        if member.outage is None:
            member.outage = Outage(time.time(), time.monotonic(), cause, member.generation - 1)
        log.warning("member %s lost (member generation %d): %s", member.name, member.generation, cause)
        self._stop_slots(self._member_slots(member))
        self._prestart(member)
        self._after_member_change(member, cause, error)
        if self.state not in (State.FAILED, State.CLOSED):
            self._after(self._backoff(1), MemberAttempt(member.name, member.generation))

    def _after_member_change(self, member: Member, cause: str, error: BaseException | None) -> None:
        """A member left service: fail a start that nothing else can carry, refresh the state."""
        if self.state == State.STARTING and not any(m.in_service for m in self.members.values()):
            # Guard() raises ``error`` itself: the caller sees what is wrong (PIN, label, module).
            single = len(self.members) == 1
            self._fail(str(error) if single and error else f"no member of the group answers at start: {cause}", error)
        elif self.state in _DISPATCHING and not any(m.in_service for m in self.members.values()):
            self._begin_recovery(cause)
        else:
            self._refresh(f"member {member.name} {member.state}: {cause}")
            self._check_started()

    def _end_member_outage(self, member: Member) -> None:
        if member.outage is None:
            return
        member.outage.end = time.time()
        member.outage.duration_s = round(time.monotonic() - member.outage.start_mono, 3)
        member.outages.append(member.outage)
        member.outage = None
        member.recoveries += 1
        self.counters.member_recoveries += 1
        log.info("member %s serves again after %.3f s", member.name, member.outages[-1].duration_s)

    # -- group recovery -----------------------------------------------------------------

    def _begin_recovery(self, cause: str) -> None:
        if self.state in (State.LOST, State.RECOVERING, State.FAILED, State.CLOSED):
            return  # single flight
        self.outage = Outage(time.time(), time.monotonic(), cause, self.generation)
        self._set_state(State.LOST, cause)
        self._stop_slots(list(self.slots.values()))
        self.registry.kill()  # the probe hosts too: nothing of this generation survives
        if self.closing:
            self._fail_queue(GuardClosed("the guard closed while the group was lost"))
            self._maybe_closed()
            return
        if self.config.policy == "fail_fast":  # nothing waits for the group: answer now
            while self.queue:
                job = self.queue.popleft()
                self._settle(job, error=OutOfService(str(self.state), job.op))
        self.generation += 1
        self.shared.generation = self.generation
        self._next_wid = 0
        self._set_state(State.RECOVERING, f"new generation {self.generation}")
        # Every member is probed afresh; the first to answer brings the group back, the
        # others follow as they answer.
        members = [m for m in self.members.values() if m.state != "out"]
        for member in members:
            if member.outage is None:
                member.outage = Outage(time.time(), time.monotonic(), cause, member.generation)
            member.state, member.reason, member.attempt = "lost", cause, 0
            member.generation += 1
        if self._load_pin():
            for member in members:
                self._prestart(member)
                self._probe_member(member)

    def _end_outage(self) -> None:
        if self.outage is None:
            return
        self.outage.end = time.time()
        self.outage.duration_s = round(time.monotonic() - self.outage.start_mono, 3)
        self.outages.append(self.outage)
        self.counters.recoveries += 1
        self.shared.recoveries = self.counters.recoveries
        log.info(
            "recovered: generation %d serving after %.3f s (cause: %s)",
            self.generation,
            self.outage.duration_s,
            self.outage.cause,
        )
        self.outage = None

    def _fail(self, reason: str, error: BaseException | None = None) -> None:
        if isinstance(error, AuthError):
            self.counters.login_failures += 1
        if self.state in (State.FAILED, State.CLOSED):
            return
        self.failed_reason = reason
        self.shared.failed_reason = reason
        if self.outage is not None:
            self.outages.append(self.outage)
            self.outage = None
        self._set_state(State.FAILED, reason)
        self._stop_slots(list(self.slots.values()), forget=False)
        self.registry.kill()
        self._fail_queue(GuardFailed(reason))
        if not self.started.done():
            self.started.set_exception(error if error is not None else GuardFailed(reason))
        self._maybe_closed()

    def _fail_queue(self, error: BaseException) -> None:
        while self.queue:
            self._settle(self.queue.popleft(), error=error)

    # -- closing ------------------------------------------------------------------------

    def _on_close(self, future: Future[None]) -> None:
        self.closing = True
        self.close_future = future
        if self.state not in _DISPATCHING:
            self._fail_queue(GuardClosed(f"the guard closed while {self.state}"))
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if (
            self.closing
            and self.close_future is not None
            and not self.close_future.done()
            and not self.queue
            and not self.inflight
        ):
            self.close_future.set_result(None)

    def _on_finalize(self, deadline_s: float) -> list[pykka.ActorRef[Any]]:
        self._fail_queue(GuardClosed("the guard closed"))
        for entry in self.inflight.values():
            self._settle(entry.job, error=GuardClosed("the guard closed with the job in flight"))
        self.inflight.clear()
        polite = self.state in _DISPATCHING
        self._set_state(State.CLOSED, "close()")
        refs: list[pykka.ActorRef[Any]] = []
        for slot in self.slots.values():
            slot.status = "stopping"
            if slot.ref is not None and slot.ref.is_alive():
                slot.ref.tell(Shutdown(deadline_s if polite else 0.0))
                refs.append(slot.ref)
        for member in self.members.values():
            if member.health is not None and member.health.is_alive():
                member.health.tell(Shutdown(deadline_s if polite else 0.0))
                refs.append(member.health)
        if not self.started.done():
            self.started.set_exception(GuardClosed("closed before it started"))
        return refs

    # -- status -------------------------------------------------------------------------

    @staticmethod
    def _outages(outages: list[Outage]) -> list[dict[str, Any]]:
        return [
            {
                "start": o.start,
                "end": o.end,
                "duration_s": o.duration_s,
                "cause": o.cause,
                "generation": o.generation,
            }
            for o in outages
        ]

    def _status(self) -> dict[str, Any]:
        workers = []
        for slot in sorted(self.slots.values(), key=lambda s: s.wid):
            host = self.registry.get(f"worker-{slot.wid}")
            workers.append(
                {
                    "id": slot.wid,
                    "member": slot.member,
                    "pid": slot.pid,
                    "alive": bool(host and host.alive and host.pid == slot.pid),
                    "status": slot.status,
                    "generation": slot.generation,
                    "ops": slot.ops,
                    "errors": slot.errors,
                    "last_error": slot.last_error,
                    "sessions_opened": slot.sessions_opened,
                    "restarts": slot.restarts,
                }
            )
        members = [
            {
                "name": m.name,
                "state": m.state,
                "generation": m.generation,
                "reason": m.reason,
                "workers": sorted(s.wid for s in self._member_slots(m)),
                "losses": m.losses,
                "recoveries": m.recoveries,
                "last_probe": m.last_probe,
                "outages": self._outages([*m.outages, *([m.outage] if m.outage else [])]),
            }
            for m in self.members.values()
        ]
        c = self.counters
        return {
            "state": str(self.state),
            "generation": self.generation,
            "policy": self.config.policy,
            "members": members,
            "workers": workers,
            "last_probe": self.last_probe,
            "outages": self._outages([*self.outages, *([self.outage] if self.outage else [])]),
            "counters": {
                "ops_ok": c.ops_ok,
                "ops_failed": c.ops_failed,
                "ops_retried": c.ops_retried,
                "outcome_unknown": c.outcome_unknown,
                "recoveries": c.recoveries,
                "member_losses": c.member_losses,
                "member_recoveries": c.member_recoveries,
                "probes": c.probes,
                "probes_failed": c.probes_failed,
                "login_failures": c.login_failures,
            },
            "queued": len(self.queue),
            "in_flight": len(self.inflight),
            "failed_reason": self.failed_reason,
        }
