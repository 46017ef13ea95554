"""The Supervisor actor: admission, dispatch, results, the clock, closing.

Data flow (after loky's ``process_executor``)::

  caller threads              | supervisor actor thread        | worker threads         | host processes
                              | (and FastLane callers, under   | (one CryptoWorker      | (one module, one
                              |  the same lock)                 |  actor each)           |  session each)
  Guard.sign() -- Job -->  FastLane.submit -> _on_submit
                              |   AdmissionQueue -> _dispatch -- RunJob --> _run
                              |                                |  HostProcess.call ======= frame ====> Host.handle
                              |                                |  (waits on pipe + pidfd) <== reply ==
  Future <-- _settle <-- FastLane.deliver <--- JobDone(result)-+  (success: worker's thread)
                              |   _on_job_done <-- JobDone(error) message
                              |   _suspect -- Report --> HealthActor (own thread) == probe ==> probe host
                              |   _on_probe <-- ProbeResult ----'
                              |   verdict: renew one worker | lose the member | recover the group
  ticker thread -- SupervisorTick --> _on_tick (deadlines, idle host deaths, periodic probes)
  threading.Timer -- MemberAttempt / RenewAttempt --> backoff retries

Which code runs where: Guard methods on the caller's thread; ``_on_submit`` on the
caller's thread and a successful ``_on_job_done`` on the worker's thread, both under
``FastLane.lock`` -- the lock the actor holds for every message, so one decision runs at
a time whatever the thread. Everything else is an actor message. Anything that carries
an older generation can only settle its own job, never change the state.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any

import pykka

from p11guard.actors import Inject as InjectMessage
from p11guard.actors import (
    Job,
    JobDone,
    ProbeResult,
    RunJob,
    Shutdown,
    Tick,
    Ticket,
    WorkerFailed,
    WorkerReady,
    WorkerStopped,
)
from p11guard.base import GuardClosed, GuardFailed, HostCrashed, HostError
from p11guard.supervisor._admission import frame_share, refusal
from p11guard.supervisor._base import is_signal
from p11guard.supervisor._messages import (
    AddCallback,
    AddObserver,
    Close,
    Finalize,
    InjectFault,
    MemberAttempt,
    RenewAttempt,
    StatusRequest,
    Submit,
    SupervisorTick,
)
from p11guard.supervisor._recovery import RecoveryDecisions
from p11guard.supervisor._states import (
    DISPATCHING,
    FINAL,
    Held,
    InFlight,
    MemberState,
    SlotState,
    State,
)
from p11guard.supervisor._status import snapshot

__all__ = ["Supervisor"]

log = logging.getLogger("p11guard")


class Supervisor(RecoveryDecisions):
    """Owns the members, their workers and health actors, the queue and every state change."""

    use_daemon_thread = True  # a process whose guard failed (or was never closed) still exits

    # -- life cycle ---------------------------------------------------------------------

    def on_start(self) -> None:
        try:
            self._start()
        except Exception as exc:  # any error while starting ends the start at once, with it
            log.exception("the guard could not start")
            self._fail(f"the guard could not start: {type(exc).__name__}: {exc}", exc)

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        # A bug in a decision: nothing may wait for a supervisor that is gone.
        reason = f"the supervisor stopped on an error: {exception_type.__name__}: {exception_value}"
        self.shared.state, self.shared.failed_reason = State.FAILED, reason
        self.effects.kill_all_hosts()
        if not self.started.done():
            self.started.set_exception(
                exception_value if isinstance(exception_value, Exception) else GuardFailed(reason)
            )
        for job in [*self.queue.drain(), *(e.job for e in self.inflight.values())]:
            self._settle(job, error=GuardFailed(reason))

    def _start(self) -> None:
        self.lane.connect(self._on_submit, self._on_job_done, self._on_submit_direct)
        self._last_tick_probe = time.monotonic()
        single = len(self.members) == 1 and not self.config.members
        for member in self.members.values():
            member.health = self.effects.start_health(
                member.name,
                member.config,
                self.actor_ref,
                lambda m=member: m.generation,
                "probe" if single else f"probe-{member.name}",
            )
        if self._load_pin():
            for member in self.members.values():
                self._prestart(member)
                self._probe_member(member)

    def on_stop(self) -> None:
        self.lane.disconnect()
        self.effects.cancel()
        for member in self.members.values():
            if member.health is not None and member.health.is_alive():
                member.health.stop(block=False)

    # -- messages -----------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        # The lock is the actor's own serialisation, shared with the FastLane callers.
        with self.lane.lock:
            try:
                return self._handle(message)
            finally:
                self._publish()

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
            self._on_member_attempt(message)
        elif isinstance(message, RenewAttempt):
            self._renew(message.wid, message.generation)
        elif isinstance(message, StatusRequest):
            return self._status()
        elif isinstance(message, InjectFault):
            self._on_inject(message)
        elif isinstance(message, AddCallback):
            self.callbacks.append(message.callback)
        elif isinstance(message, AddObserver):
            self._add_observer(message.observer)
        elif isinstance(message, Close):
            self._on_close(message.future)
        elif isinstance(message, Finalize):
            return self._on_finalize(message.deadline_s)
        return None

    # -- admission and dispatch ---------------------------------------------------------

    def _on_submit(self, job: Job) -> None:
        error = refusal(self.state, self.config.policy, job.op, closing=self.closing, failed_reason=self.failed_reason)
        if error is not None:
            self._settle(job, error=error)
        else:
            self.queue.append(job)
            self._dispatch()

    def _on_submit_direct(self, job: Job) -> Ticket | None:
        """A blocking caller's job: lend it a free worker's host when nothing waits (the
        caller runs the job on its own thread), else queue it as any other."""
        if (
            self.state in DISPATCHING
            and not self.closing
            and not self.queue
            and self.idle
            and job.items is None
            and (job.idempotent or not job.label or not self._label_changing(job.label))
        ):
            wid = self.idle[0]
            slot = self.slots.get(wid)
            host = self.effects.worker_host(wid)
            if slot is not None and slot.status == SlotState.IDLE and host is not None and host.broken is None:
                self.idle.popleft()
                slot.status = SlotState.BUSY
                slot.jobs[job.seq] = job
                job.attempts += 1
                self.inflight[job.seq] = InFlight(self.generation, wid, job)
                self.counters.direct += 1
                return Ticket(wid, self.generation, host, self.members[slot.member].config.call_s)
        self._on_submit(job)
        return None

    def _label_changing(self, label: str) -> bool:
        return any(not e.job.idempotent and e.job.label == label for e in self.inflight.values())

    def _dispatch(self) -> None:
        if self.state not in DISPATCHING or not (self.queue and self.idle):
            return
        now = time.monotonic()
        # Token-changing jobs are serialised per label: the second waits for the first.
        # (Found only when one is met: a scan of everything in flight per call cost
        # ~20 us an operation with 256 in flight.)
        changing: set[str | None] | None = None
        waiting: list[Job] = []
        while self.queue and self.idle:
            wid = self.idle.popleft()
            slot = self.slots.get(wid)
            if slot is None or slot.status != SlotState.IDLE or slot.ref is None:
                continue
            job = self.queue.pop()
            if now >= job.deadline:
                self._expire(job)
                self.idle.appendleft(wid)
                continue
            if not job.idempotent and job.label:
                if changing is None:
                    changing = {e.job.label for e in self.inflight.values() if not e.job.idempotent and e.job.label}
                if job.label in changing:
                    waiting.append(job)
                    self.idle.appendleft(wid)
                    continue
                changing.add(job.label)
            frame = [job, *self._coalesce(job, now)]
            if len(frame) > 1:
                self.counters.coalesced += len(frame)
            slot.status = SlotState.BUSY
            for one in frame:
                slot.jobs[one.seq] = one
                one.attempts += 1
                self.inflight[one.seq] = InFlight(self.generation, wid, one)
            slot.ref.tell(RunJob(job, tuple(frame[1:])))
        for job in reversed(waiting):
            self.queue.retry(job)

    def _coalesce(self, first: Job, now: float) -> list[Job]:
        """More single operations for the same frame, while more wait than workers are free
        (never waiting for any: a lone caller's op goes at once, alone), up to the worker's
        share of the work (:func:`frame_share`)."""
        if first.items is not None or not first.idempotent or len(self.queue) <= len(self.idle):
            return []
        serving = sum(1 for s in self.slots.values() if s.serving)
        share = frame_share(len(self.queue) + 1 + len(self.inflight), serving, self.config.batch_size)
        more: list[Job] = []
        for job in self.queue.coalescable(share - 1, len(self.idle)):
            if now >= job.deadline:
                self._expire(job)
            else:
                more.append(job)
        return more

    def _on_job_done(self, msg: JobDone) -> None:
        entry = self.inflight.pop(msg.job.seq, None)
        slot = self.slots.get(msg.wid)
        current = (
            entry is not None
            and msg.generation == self.generation
            and slot is not None
            and slot.generation == msg.generation
            and slot.jobs.pop(msg.job.seq, None) is msg.job
        )
        if current:
            assert slot is not None
            slot.ops += len(msg.job.items) if msg.job.items else 1
        if msg.error is None:
            self._settle(msg.job, result=msg.result)
            if current:
                assert slot is not None
                slot.fail_streak = 0
        elif not is_signal(msg.error):
            self._settle(msg.job, error=msg.error)
        elif current:
            # Evidence, not a verdict: the job waits for the probe of this worker's member.
            assert slot is not None
            outcome = msg.result if msg.result is not None else msg.error
            self._hold(self.members[slot.member], Held(msg.job, outcome, host_loaded_at=slot.host_loaded_at), msg.error)
            if slot.status != SlotState.SUSPECT:  # once per frame
                self._suspect(slot, msg.error)
        else:
            self._lost_in_flight(msg.job, msg.error)
        if current:
            assert slot is not None
            if not slot.jobs and slot.status == SlotState.BUSY:
                slot.status = SlotState.IDLE
                self.idle.append(slot.wid)
        self._dispatch()
        self._maybe_closed()

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
            and slot.status != SlotState.STOPPING
            and self.state not in FINAL
        ):
            # The worker actor died on its own (a bug, or on_start raised): one_for_one.
            slot.ref = None
            slot.status = SlotState.SUSPECT
            slot.last_error_kind = "host"
            self._schedule_renew(slot)
        self._dispatch()
        self._maybe_closed()

    # -- the clock ----------------------------------------------------------------------

    def _on_tick(self) -> None:
        now = time.monotonic()
        for job in self.queue.expired(now):
            self._expire(job)
        for member in self.members.values():
            for held in [h for h in member.held if now >= h.job.deadline]:
                member.held.remove(held)
                self._expire(held.job)
        if self.state in DISPATCHING:
            # An idle worker's host that died (killed, OOM...) is noticed now, not by the
            # next job that would meet it.
            for slot in list(self.slots.values()):
                host = self.effects.worker_host(slot.wid)
                if slot.status == SlotState.IDLE and (host is None or not host.alive):
                    crash = HostCrashed(
                        f"idle host exited with {host.exitcode if host else None}",
                        pid=slot.pid,
                        generation=self.generation,
                    )
                    self._suspect(slot, crash)
        if self.state in DISPATCHING and now - self._last_tick_probe >= self.config.probe_interval_s:
            self._last_tick_probe = now
            for member in self.members.values():
                if member.health is not None and member.state in (MemberState.SERVING, MemberState.SUSPECT):
                    member.health.tell(Tick(member.generation))

    def _on_inject(self, msg: InjectFault) -> None:
        slot = self.slots.get(msg.wid)
        if slot is None or slot.ref is None:
            msg.future.set_exception(ValueError(f"no worker {msg.wid} (workers: {sorted(self.slots)})"))
            return
        slot.ref.tell(InjectMessage(msg.args, msg.future))

    # -- closing ------------------------------------------------------------------------

    def _on_close(self, future: Future[None]) -> None:
        self.closing = True
        self.close_future = future
        if self.state not in DISPATCHING:
            self._fail_queue(GuardClosed(f"the guard closed while {self.state}"))
        self._maybe_closed()

    def _on_finalize(self, deadline_s: float) -> list[pykka.ActorRef[Any]]:
        self._fail_queue(GuardClosed("the guard closed"))
        for entry in self.inflight.values():
            self._settle(entry.job, error=GuardClosed("the guard closed with the job in flight"))
        self.inflight.clear()
        for member in self.members.values():
            for held in member.held:
                self._settle(held.job, error=GuardClosed("the guard closed while the job waited for a probe"))
            member.held.clear()
        polite = self.state in DISPATCHING
        self._set_state(State.CLOSED, "close()")
        refs: list[pykka.ActorRef[Any]] = []
        for slot in self.slots.values():
            slot.status = SlotState.STOPPING
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

    def _status(self) -> dict[str, Any]:
        return snapshot(
            state=self.state,
            generation=self.generation,
            policy=self.config.policy,
            members=self.members.values(),
            slots=self.slots.values(),
            worker_host=self.effects.worker_host,
            last_probe=self.last_probe,
            outages=self.outages,
            outage=self.outage,
            counters=self.counters,
            queued=len(self.queue),
            in_flight=len(self.inflight),
            failed_reason=self.failed_reason,
            keys=self.effects.pins.snapshot(),
        )
