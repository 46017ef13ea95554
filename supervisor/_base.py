"""The supervisor's books and the primitives every decision uses.

:class:`SupervisorBase` holds the state, the members, the worker slots, the queue, the
in-flight jobs, outages and counters, and changes them only through small primitives
(:meth:`_set_state`, :meth:`_settle`, :meth:`_fail`...). The decisions are its
subclasses: :mod:`._recovery` (workers, probes, members, group recovery) and
:mod:`._supervisor` (the actor's messages, admission, dispatch, closing).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pykka

from p11guard.actors import Job
from p11guard.base import (
    AuthError,
    Config,
    ConfigError,
    GuardClosed,
    GuardFailed,
    HostError,
    OpTimeout,
    OutcomeUnknown,
    OutOfService,
    RemoteError,
    Secret,
)
from p11guard.protocol import LOSS_KINDS, SIGNAL_KINDS
from p11guard.supervisor._admission import AdmissionQueue
from p11guard.supervisor._effects import Effects
from p11guard.supervisor._states import (
    DISPATCHING,
    FINAL,
    OUTAGES_KEPT,
    Counters,
    Held,
    InFlight,
    Member,
    MemberState,
    Outage,
    SharedState,
    SlotState,
    State,
    WorkerSlot,
)

__all__ = ["JobObserver", "SupervisorBase", "is_loss", "is_signal", "short"]

#: Called with ``(job, result, error)`` as every job ends (see :meth:`SupervisorBase._settle`).
JobObserver = Callable[[Job, Any, BaseException | None], None]

log = logging.getLogger("p11guard")


def is_signal(error: BaseException | None) -> bool:
    """A loss signal: anything not clearly the caller's (a module error of kind
    ``group_loss``, ``session`` or ``internal``; a host that crashed, hung or broke its
    channel). The worker is suspect and the probe decides; the job waits for the verdict."""
    if isinstance(error, HostError):
        return True
    return isinstance(error, RemoteError) and error.kind in SIGNAL_KINDS


def is_loss(error: BaseException | None) -> bool:
    """One of the classic loss codes (or a failed host): decisive without a second try."""
    if isinstance(error, HostError):
        return True
    return isinstance(error, RemoteError) and error.kind in LOSS_KINDS


def short(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}"


def _ownable(outcome: Any, vouched: bool) -> bool:
    """Can this error be the request's own, whatever the group does? A module error of kind
    ``internal`` or ``session`` can (a module bug on one input, a handle that one key leaves
    invalid); a loss code or a failed host never is -- such a job is retried until its
    deadline, however often the probe says the group is fine (a probe whose connection did
    not live through a short outage answers, while the workers' stay broken until renewed).

    ``vouched``: the probe's host is no younger than the one that failed. If it is younger,
    an ``internal`` error is not the request's: a TPM restarted between the two answers the
    new connection and CKR_GENERAL_ERROR on the old one. (A ``session`` error still is: its
    worker's renewal opens a new session, which is all such an error questions.)"""
    errors = [outcome] if isinstance(outcome, BaseException) else [o for o in outcome if isinstance(o, BaseException)]
    kinds = ("internal", "session") if vouched else ("session",)
    return any(isinstance(e, RemoteError) and e.kind in kinds for e in errors)


class SupervisorBase(pykka.ThreadingActor):
    """The books, and the primitives that change them."""

    def __init__(self, config: Config, started: Future[None], shared: SharedState, effects: Effects) -> None:
        super().__init__()
        self.config = config
        self.started = started
        self.shared = shared
        self.effects = effects
        self.lane = effects.lane
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
        self.queue = AdmissionQueue()
        self.inflight: dict[int, InFlight] = {}
        self.outages: deque[Outage] = deque(maxlen=OUTAGES_KEPT)  # the last ones; totals in counters
        self.outage: Outage | None = None
        self.counters = Counters()
        self.last_probe: dict[str, Any] | None = None
        self.callbacks: list[Callable[[str, str, dict[str, Any]], None]] = []
        #: The one hook on the hot path: told of every job as it ends (metrics). ``None``
        #: costs nothing; several observers are called through :meth:`_fan_out`.
        self.observer: JobObserver | None = None
        self.observers: list[JobObserver] = []
        self.failed_reason: str | None = None
        self.closing = False
        self.close_future: Future[None] | None = None
        self._next_wid = 0
        self._pin: Secret | None = None

    # -- to be decided by the subclasses -------------------------------------------------

    def _dispatch(self) -> None:
        raise NotImplementedError

    def _stop_slots(self, slots: list[WorkerSlot], forget: bool = True) -> None:
        raise NotImplementedError

    # -- primitives ---------------------------------------------------------------------

    def _load_pin(self) -> bool:
        """Read the PIN (again: it may have changed); a config error fails the guard."""
        try:
            self._pin = self.config.load_pin()
        except ConfigError as exc:
            self._fail(str(exc), exc)
            return False
        return True

    def _after(self, delay: float, message: Any) -> None:
        self.effects.after(delay, self.actor_ref, message)

    def _backoff(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (1, 2, ...): exponential, capped, with jitter."""
        delay: float = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2.0 ** max(attempt - 1, 0))
        return delay * random.uniform(0.5, 1.0)  # jitter: many clients must not retry in step

    def _set_state(self, new: State, cause: str | None = None) -> None:
        old = self.state
        if old == new:
            return
        self.state = new
        self.shared.since, self.shared.cause = time.time(), cause
        self.shared.state = new
        self.shared.generation = self.generation
        self._publish()
        level = logging.WARNING if new in (State.SUSPECT, State.LOST, State.FAILED) else logging.INFO
        log.log(level, "state %s -> %s (generation %d)%s", old, new, self.generation, f": {cause}" if cause else "")
        info = {"generation": self.generation, "cause": cause}
        for callback in list(self.callbacks):
            try:
                callback(str(old), str(new), info)
            except Exception:
                log.exception("state-change callback failed")

    def _publish(self) -> None:
        """What the Guard reads without asking (health, members_serving): no member serves
        while the group is not dispatching, whatever the members' books say a moment."""
        serving = sum(m.state == MemberState.SERVING for m in self.members.values())
        self.shared.members_serving = serving if self.state in DISPATCHING else 0
        self.shared.members_total = len(self.members)

    def _refresh(self, cause: str) -> None:
        """SERVING while some member serves, SUSPECT while none does but some is in service."""
        if self.state not in DISPATCHING:
            return
        if any(m.state == MemberState.SERVING for m in self.members.values()):
            self._set_state(State.SERVING, cause)
        else:
            self._set_state(State.SUSPECT, cause)

    def _member_slots(self, member: Member) -> list[WorkerSlot]:
        return [s for s in self.slots.values() if s.member == member.name]

    def _add_observer(self, observer: JobObserver) -> None:
        self.observers.append(observer)
        self.observer = self.observers[0] if len(self.observers) == 1 else self._fan_out

    def _fan_out(self, job: Job, result: Any, error: BaseException | None) -> None:
        for observer in self.observers:
            observer(job, result, error)

    def _settle(self, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        """Complete the caller's Future (once; a job settled before is left alone).

        Every job ends here, so the observer (if any) is told here, before the caller
        sees the outcome.
        """
        if job.future.done():
            return
        if self.observer is not None:
            try:
                self.observer(job, result, error)
            except Exception:
                log.exception("a job observer failed; observers removed (metrics stop counting operations)")
                self.observer, self.observers = None, []
        count = len(job.items) if job.items else 1
        if error is None:
            job.future.set_result(result)
            self.counters.ops_ok += count
        else:
            job.future.set_exception(error)
            self.counters.ops_failed += count
            if isinstance(error, OutcomeUnknown):
                self.counters.outcome_unknown += 1

    def _expire(self, job: Job) -> None:
        self._settle(job, error=OpTimeout(job.name, self.config.op_deadline_s, str(self.state), job.last_error))

    def _fail_queue(self, error: BaseException) -> None:
        for member in self.members.values():
            self._requeue_held(member)
        for job in self.queue.drain():
            self._settle(job, error=error)

    # -- jobs that met a loss signal ----------------------------------------------------

    def _settled_at_signal(self, job: Job, error: BaseException) -> bool:
        """Settle a job whose attempt ended in a loss signal if it cannot be retried;
        ``True`` if it was."""
        if self.state == State.FAILED:
            self._settle(job, error=GuardFailed(self.failed_reason or "failed"))
        elif self.closing:
            self._settle(job, error=GuardClosed(f"the guard closed while {job.name} was in flight ({short(error)})"))
        elif not job.idempotent:
            self._settle(job, error=OutcomeUnknown(job.op, job.label, f"a loss signal arrived ({short(error)})"))
        elif time.monotonic() >= job.deadline:
            job.last_error = short(error)
            self._expire(job)
        elif self.config.policy == "fail_fast" and self.state not in DISPATCHING:
            self._settle(job, error=OutOfService(str(self.state), job.op))
        else:
            return False
        return True

    def _retry(self, job: Job, error: BaseException | None) -> None:
        """Back to the front of the queue: it has waited longest."""
        if error is not None:
            job.last_error = short(error)
        self.counters.ops_retried += len(job.items) if job.items else 1
        self.queue.retry(job)

    def _lost_in_flight(self, job: Job, error: BaseException) -> None:
        """A job whose worker is gone with a verdict already made (member or group lost,
        worker stopped): retried wherever the group serves next, if it can be."""
        if not self._settled_at_signal(job, error):
            self._retry(job, error)

    def _hold(self, member: Member, held: Held, error: BaseException) -> None:
        """A job that met a loss signal on a member in service waits for the verdict."""
        if not self._settled_at_signal(held.job, error):
            held.job.last_error = short(error)
            member.held.append(held)

    def _requeue_held(self, member: Member) -> None:
        """The verdict is a loss: every held job is retried on what serves next."""
        held, member.held = member.held, []
        for h in reversed(held):  # retry() puts each at the front: keep their order
            self._lost_in_flight(h.job, h.outcome if isinstance(h.outcome, BaseException) else HostError("loss"))

    def _release_held(self, member: Member, probe_started: float, probe_loaded_at: float) -> None:
        """The verdict is "the member is fine": a held job's error was its own. Retried
        once (on another worker: its own is renewed), then the error is its answer.

        An OK from a probe host younger than the job's host does not make an ``internal``
        error the job's own (see :func:`_ownable`): the job is retried without counting it,
        until it fails on a host the probe vouches for (its own worker gets a new host).
        """
        keep: list[Held] = []
        for h in member.held:
            if h.at > probe_started:
                keep.append(h)  # met its signal after this probe began: wait for the next
                continue
            if _ownable(h.outcome, vouched=h.host_loaded_at >= probe_loaded_at):
                h.job.cleared += 1
            if h.job.cleared >= 2:
                if isinstance(h.outcome, BaseException):
                    self._settle(h.job, error=h.outcome)
                else:
                    self._settle(h.job, result=h.outcome)
            else:
                self._retry(h.job, None)
        member.held = keep
        self._dispatch()

    def _fail(self, reason: str, error: BaseException | None = None) -> None:
        """FAILED: a reason retrying cannot fix. Everything waiting gets :class:`GuardFailed`."""
        if isinstance(error, AuthError):
            self.counters.login_failures += 1
        if self.state in FINAL:
            return
        self.failed_reason = reason
        self.shared.failed_reason = reason
        self.shared.outage_cause = None
        if self.outage is not None:
            self.outages.append(self.outage)
            self.outage = None
        self._set_state(State.FAILED, reason)
        self._stop_slots(list(self.slots.values()), forget=False)
        self.effects.kill_all_hosts()
        self._fail_queue(GuardFailed(reason))
        if not self.started.done():
            self.started.set_exception(error if error is not None else GuardFailed(reason))
        self._maybe_closed()

    def _check_started(self) -> None:
        """``Guard()`` returns once every worker has started or given up, one serving."""
        if self.started.done():
            return
        if any(s.status == SlotState.STARTING for s in self.slots.values()):
            return
        if any(s.serving for s in self.slots.values()):
            self.started.set_result(None)

    def _maybe_closed(self) -> None:
        if (
            self.closing
            and self.close_future is not None
            and not self.close_future.done()
            and not self.queue
            and not self.inflight
            and not any(m.held for m in self.members.values())
        ):
            self.close_future.set_result(None)
