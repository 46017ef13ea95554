"""The Supervisor actor: state machine, admission, single-flight recovery, worker lifecycle.

States: STARTING -> SERVING <-> SUSPECT -> LOST -> RECOVERING -> SERVING; FAILED and
CLOSED are final. One actor owns every decision, so one recovery runs at a time whatever
the number of reports: messages are handled one by one, and anything that carries an
older generation can only settle its own job, never change the state.
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

from p11guard._config import Config
from p11guard._errors import (
    AuthError,
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
)
from p11guard._secret import Secret
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
    """Owns the workers, the health actor, the queue and every state change."""

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
        self.recovery_attempt = 0
        self._timers: list[threading.Timer] = []
        self._last_tick_probe = time.monotonic()
        self._pin: Secret | None = None
        self.health: pykka.ActorRef[Any] | None = None
        self._start_error: BaseException | None = None

    # -- life cycle ---------------------------------------------------------------------

    def on_start(self) -> None:
        self.lane.connect(self._on_submit, self._on_job_done)
        shared = self.shared
        self.health = HealthActor.start(self.config, self.actor_ref, self.registry, lambda: shared.generation)
        if self._load_pin():
            assert self._pin is not None and self.health is not None
            self.health.tell(StartProbe(self.generation, self._pin))

    def on_stop(self) -> None:
        self.lane.disconnect()
        for timer in self._timers:
            timer.cancel()
        if self.health is not None and self.health.is_alive():
            self.health.stop(block=False)

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

    # -- messages -----------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        # The lock is the actor's own serialisation, shared with the FastLane callers.
        with self.lane.lock:
            return self._handle(message)

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
        elif isinstance(message, RecoveryAttempt):
            if message.generation == self.generation and self.state == State.RECOVERING:
                self._recovery_probe()
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
            for slot in self.slots.values():
                host = self.registry.get(f"worker-{slot.wid}")
                if slot.status == "idle" and (host is None or not host.alive):
                    crash = HostCrashed(
                        f"idle host exited with {host.exitcode if host else None}",
                        pid=slot.pid,
                        generation=self.generation,
                    )
                    self._suspect(slot, crash)
        if (
            self.state in _DISPATCHING
            and self.health is not None
            and now - self._last_tick_probe >= self.config.probe_interval_s
        ):
            self._last_tick_probe = now
            self.health.tell(Tick(self.generation))

    # -- workers ------------------------------------------------------------------------

    def _start_workers(self) -> None:
        assert self._pin is not None
        self.slots, self.idle = {}, deque()
        for wid in range(self.config.workers):
            slot = WorkerSlot(wid, self.generation)
            self.slots[wid] = slot
            slot.ref = CryptoWorker.start(
                wid, self.generation, self.config, self._pin, self.actor_ref, self.registry, self.lane
            )

    def _on_worker_ready(self, msg: WorkerReady) -> None:
        slot = self.slots.get(msg.wid)
        if msg.generation != self.generation or slot is None or self.state in (State.FAILED, State.CLOSED):
            return
        slot.status, slot.pid, slot.sessions_opened = "idle", msg.pid, msg.sessions_opened
        self.idle.append(msg.wid)
        if self.state == State.RECOVERING:
            self._end_outage()
            self._set_state(State.SERVING, f"worker {msg.wid} serves generation {self.generation}")
        elif self.state == State.STARTING:
            self._set_state(State.SERVING, f"worker {msg.wid} ready")
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
        if isinstance(msg.error, AuthError | ModuleLoadError):
            self._fail(f"worker {msg.wid} could not log in: {msg.error}", msg.error)
            return
        if self.state == State.STARTING and all(s.status == "suspect" or s is slot for s in self.slots.values()):
            self._fail(f"no worker could start: {msg.error}", msg.error)
            return
        self._suspect(slot, msg.error)

    def _suspect(self, slot: WorkerSlot, error: BaseException) -> None:
        slot.fail_streak += 1  # reset by a job that succeeds: renewals back off until then
        slot.status = "suspect"
        slot.errors += 1
        slot.last_error = _short(error)
        slot.last_error_kind = error.kind if isinstance(error, RemoteError) else "host"
        log.warning("worker %d (pid %s) reports a loss signal: %s", slot.wid, slot.pid, slot.last_error)
        self._check_started()
        if self.health is not None:
            self.health.tell(Report(slot.wid, self.generation, slot.last_error))
        if self.state == State.SERVING:
            self._set_state(State.SUSPECT, f"worker {slot.wid}: {slot.last_error}")

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
                wid, self.generation, self.config, self._pin, self.actor_ref, self.registry, self.lane
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
            delay = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** (slot.fail_streak - 2))
        if delay:
            self._after(delay * random.uniform(0.5, 1.0), RenewAttempt(slot.wid, self.generation))
        else:
            self._renew(slot.wid, self.generation)

    def _on_inject(self, msg: InjectFault) -> None:
        slot = self.slots.get(msg.wid)
        if slot is None or slot.ref is None:
            msg.future.set_exception(ValueError(f"no worker {msg.wid} (workers: {sorted(self.slots)})"))
            return
        slot.ref.tell(Inject(msg.args, msg.future))

    # -- health and recovery ------------------------------------------------------------

    def _on_probe(self, res: ProbeResult) -> None:
        if res.generation != self.generation:
            return
        self.counters.probes += 1
        if not res.ok:
            self.counters.probes_failed += 1
        self.last_probe = {
            "ok": res.ok,
            "at": res.at,
            "latency_s": round(res.latency_s, 6),
            "error": None if res.error is None else _short(res.error),
        }
        if res.fresh:
            self._on_fresh_probe(res)
            return
        if self.state not in (State.STARTING, *_DISPATCHING):
            return
        if res.ok:
            if self.state == State.SUSPECT:
                self._set_state(State.SERVING, "probe OK: false alarm")
            for slot in self.slots.values():
                if slot.status == "suspect":
                    log.info("probe OK: renewing worker %d only (one_for_one)", slot.wid)
                    self._schedule_renew(slot)
        elif isinstance(res.error, AuthError | ModuleLoadError):
            self._fail(str(res.error), res.error)
        elif self.state == State.STARTING:
            self._fail(f"probe failed during start: {res.error}", res.error)
        else:
            self._begin_recovery(
                f"probe failed ({res.cause or 'periodic'}): {_short(res.error) if res.error else 'unknown'}"
            )

    def _on_fresh_probe(self, res: ProbeResult) -> None:
        if self.state == State.STARTING:
            if res.ok:
                self._start_workers()
            else:
                assert res.error is not None
                self._fail(str(res.error), res.error)
        elif self.state == State.RECOVERING:
            if res.ok:
                log.info(
                    "group answers again (generation %d); starting %d workers",
                    self.generation,
                    self.config.workers,
                )
                self._start_workers()
            elif isinstance(res.error, AuthError | ModuleLoadError):
                self._fail(str(res.error), res.error)
            else:
                self.recovery_attempt += 1
                delay = min(
                    self.config.backoff_max_s,
                    self.config.backoff_initial_s * 2 ** (self.recovery_attempt - 1),
                )
                delay *= random.uniform(0.5, 1.0)  # jitter: many clients must not retry in step
                log.debug("recovery probe %d failed (%s); next in %.3f s", self.recovery_attempt, res.error, delay)
                self._after(delay, RecoveryAttempt(self.generation))

    def _stop_workers(self) -> None:
        """Kill every host first (a blocked call then fails at once), then stop the actors."""
        self.registry.kill(h for h in self.registry.hosts() if h.name != "probe")
        for slot in self.slots.values():
            slot.status = "stopping"
            if slot.ref is not None:
                slot.ref.stop(block=False)
        self.idle.clear()

    def _begin_recovery(self, cause: str) -> None:
        if self.state in (State.LOST, State.RECOVERING, State.FAILED, State.CLOSED):
            return  # single flight
        self.outage = Outage(time.time(), time.monotonic(), cause, self.generation)
        self._set_state(State.LOST, cause)
        self._stop_workers()
        self.registry.kill()  # the probe host too: nothing of this generation survives
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
        self.recovery_attempt = 0
        self._set_state(State.RECOVERING, f"new generation {self.generation}")
        self._recovery_probe()

    def _recovery_probe(self) -> None:
        # The PIN is read again: it may have changed during the outage. A wrong one fails
        # the probe's single login and we go to FAILED -- never a retry loop on the PIN.
        if self._load_pin():
            assert self._pin is not None and self.health is not None
            self.health.tell(StartProbe(self.generation, self._pin))

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
        self._stop_workers()
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
        if self.health is not None and self.health.is_alive():
            self.health.tell(Shutdown(deadline_s if polite else 0.0))
            refs.append(self.health)
        if not self.started.done():
            self.started.set_exception(GuardClosed("closed before it started"))
        return refs

    # -- status -------------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        workers = []
        for slot in sorted(self.slots.values(), key=lambda s: s.wid):
            host = self.registry.get(f"worker-{slot.wid}")
            workers.append(
                {
                    "id": slot.wid,
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
        outages = [
            {
                "start": o.start,
                "end": o.end,
                "duration_s": o.duration_s,
                "cause": o.cause,
                "generation": o.generation,
            }
            for o in [*self.outages, *([self.outage] if self.outage else [])]
        ]
        c = self.counters
        return {
            "state": str(self.state),
            "generation": self.generation,
            "policy": self.config.policy,
            "workers": workers,
            "last_probe": self.last_probe,
            "outages": outages,
            "counters": {
                "ops_ok": c.ops_ok,
                "ops_failed": c.ops_failed,
                "ops_retried": c.ops_retried,
                "outcome_unknown": c.outcome_unknown,
                "recoveries": c.recoveries,
                "probes": c.probes,
                "probes_failed": c.probes_failed,
                "login_failures": c.login_failures,
            },
            "queued": len(self.queue),
            "in_flight": len(self.inflight),
            "failed_reason": self.failed_reason,
        }
