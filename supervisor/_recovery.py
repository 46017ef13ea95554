"""Decisions about workers, members and the group: one_for_one, member loss, full recovery.

- A worker that reports a loss signal is suspect; its member's HealthActor probes. The
  probe answers: only that worker is renewed (one_for_one). The probe fails: the member
  is lost -- its hosts are killed and it is re-probed with capped jittered backoff while
  the others serve. Every member lost: the group is lost and recovers as a whole
  (one_for_all, a new group generation), once, whatever the number of reports.
- Wrong PIN, unloadable module, a member without the group's token: kept out, never
  retried for the PIN; when nothing is left, FAILED.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from p11guard.actors import ProbeResult, Renew, Report, StartProbe, WorkerFailed, WorkerReady
from p11guard.base import AuthError, GuardClosed, ModuleLoadError, OutOfService, RemoteError
from p11guard.host import HostProcess
from p11guard.supervisor._base import SupervisorBase, is_loss, short
from p11guard.supervisor._identity import token_mismatch
from p11guard.supervisor._messages import MemberAttempt, RenewAttempt
from p11guard.supervisor._states import DISPATCHING, FINAL, Member, MemberState, Outage, SlotState, State, WorkerSlot

__all__ = ["RecoveryDecisions"]

log = logging.getLogger("p11guard")


class RecoveryDecisions(SupervisorBase):
    """Workers' life cycle, probe verdicts, member loss and return, group recovery."""

    # -- workers ------------------------------------------------------------------------

    def _start_workers(self, member: Member, given: HostProcess | None = None) -> None:
        """Start the member's workers; the first takes ``given`` (a logged-in probe host)."""
        assert self._pin is not None
        if member.served:  # back after a loss: these hosts replace lost ones
            self.counters.host_restarts += member.workers
        for _ in range(member.workers):
            wid, self._next_wid = self._next_wid, self._next_wid + 1
            slot = WorkerSlot(wid, self.generation, member.name)
            self.slots[wid] = slot
            slot.ref = self.effects.start_worker(wid, self.generation, member.config, self._pin, self.actor_ref, given)
            given = None

    def _on_worker_ready(self, msg: WorkerReady) -> None:
        slot = self.slots.get(msg.wid)
        if msg.generation != self.generation or slot is None or self.state in FINAL:
            return
        member = self.members[slot.member]
        if msg.token and not self._same_token(member, msg.token):
            return
        if msg.mechanisms:
            member.mechanisms = msg.mechanisms
        slot.status, slot.pid, slot.sessions_opened = SlotState.IDLE, msg.pid, msg.sessions_opened
        slot.host_loaded_at = msg.host_loaded_at
        self.idle.append(msg.wid)
        member.served = True
        if member.state in (MemberState.STARTING, MemberState.RECOVERING):
            member.state, member.reason, member.attempt = MemberState.SERVING, None, 0
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

    def _on_worker_failed(self, msg: WorkerFailed) -> None:
        slot = self.slots.get(msg.wid)
        if msg.generation != self.generation or slot is None or self.state in FINAL:
            return
        member = self.members[slot.member]
        if self._pin_proven(member, slot, msg.error):
            # The probe logged in with this very PIN in this member generation: the module
            # maps a device failure to a PIN code (tpm2-pkcs11 answers CKR_PIN_INCORRECT when
            # the TPM cannot unseal). One renewal; a second PIN error keeps the member out.
            log.warning("worker %d: %s although the probe logged in with this PIN: renewed once", slot.wid, msg.error)
            self._suspect(slot, msg.error)
            self._schedule_renew(slot)
            return
        if self._keeps_out(member, msg.error):
            self._keep_out(member, f"worker {msg.wid} could not log in: {msg.error}", msg.error)
            return
        if (
            self.state == State.STARTING
            and all(s.status == SlotState.SUSPECT or s is slot for s in self.slots.values())
            and not any(m.state == MemberState.STARTING and not self._member_slots(m) for m in self.members.values())
        ):
            self._fail(f"no worker could start: {msg.error}", msg.error)
            return
        self._suspect(slot, msg.error)

    def _suspect(self, slot: WorkerSlot, error: BaseException) -> None:
        slot.fail_streak += 1  # reset by a job that succeeds: renewals back off until then
        slot.status = SlotState.SUSPECT
        slot.errors += 1
        slot.last_error = short(error)
        slot.last_error_kind = error.kind if isinstance(error, RemoteError) else "host"
        member = self.members[slot.member]
        log.warning(
            "worker %d (pid %s, member %s) reports a loss signal: %s", slot.wid, slot.pid, member.name, slot.last_error
        )
        self._check_started()
        if member.health is not None:
            member.health.tell(Report(slot.wid, member.generation, slot.last_error))
        if member.state == MemberState.SERVING:
            member.state = MemberState.SUSPECT
            self._refresh(f"worker {slot.wid}: {slot.last_error}")

    def _renew(self, wid: int, generation: int) -> None:
        slot = self.slots.get(wid)
        if generation != self.generation or slot is None or slot.status != SlotState.RENEWING:
            return
        assert self._pin is not None
        slot.restarts += 1
        if slot.ref is not None and slot.ref.is_alive():
            # A session error with a live host: a new session is enough. Else a new host.
            new_host = slot.last_error_kind != "session"
            self.counters.host_restarts += int(new_host)
            slot.ref.tell(Renew(self._pin, new_host=new_host))
        else:
            self.counters.host_restarts += 1
            slot.status = SlotState.STARTING
            config = self.members[slot.member].config
            slot.ref = self.effects.start_worker(wid, self.generation, config, self._pin, self.actor_ref)

    def _schedule_renew(self, slot: WorkerSlot) -> None:
        slot.status = SlotState.RENEWING
        delay = self._backoff(slot.fail_streak - 1) if slot.fail_streak > 1 else 0.0
        if delay:
            self._after(delay, RenewAttempt(slot.wid, self.generation))
        else:
            self._renew(slot.wid, self.generation)

    def _stop_slots(self, slots: list[WorkerSlot], forget: bool = True) -> None:
        """Kill the hosts first (a blocked call then fails at once), then stop the actors.

        Forgotten slots are gone from the books: whatever their actors still send can only
        settle its own job (worker ids are never reused within a group generation).
        """
        self.effects.kill_worker_hosts(s.wid for s in slots)
        for slot in slots:
            slot.status = SlotState.STOPPING
            if slot.ref is not None:
                slot.ref.stop(block=False)
            if forget:
                self.slots.pop(slot.wid, None)
        stopped = {s.wid for s in slots}
        self.idle = deque(wid for wid in self.idle if wid not in stopped)

    # -- probes -------------------------------------------------------------------------

    def _same_token(self, member: Member, token: Any) -> bool:
        """Is this the member's token? A different one is kept out, never served."""
        mismatch = token_mismatch(member, token, self.config.serials)
        if mismatch is not None:
            self._keep_out(member, mismatch.reason or str(mismatch), mismatch)
            return False
        return True

    def _pin_proven(self, member: Member, slot: WorkerSlot, error: BaseException) -> bool:
        return isinstance(error, AuthError) and member.pin_proven == member.generation and slot.fail_streak == 0

    def _keeps_out(self, member: Member, error: BaseException | None) -> bool:
        """A verdict that retrying cannot change.

        A PIN error, always: retrying it burns the token's retry counter. Before the member
        has served, also an unloadable module and -- for a member of a listed group -- a
        module that answers without the group's token: configuration errors. After it has
        served, the same failures are the member (or group) being lost: retried with
        backoff, like any other.
        """
        if isinstance(error, AuthError):
            return True
        if member.served:
            return False
        if isinstance(error, ModuleLoadError):
            return True
        return bool(self.config.members) and isinstance(error, RemoteError) and error.name == "token_label_unknown"

    def _prestart(self, member: Member) -> None:
        """Spare hosts for the member's next probe and workers boot now, from this thread
        (which outlives them), so that its recovery does not wait for Python to start."""
        self.effects.prestart(member.config.module_env, member.workers + 2)

    def _probe_member(self, member: Member) -> None:
        assert self._pin is not None and member.health is not None
        handover = member.state == MemberState.LOST  # a member coming back: its probe host becomes a worker
        member.health.tell(StartProbe(member.generation, self._pin, self.generation, handover))

    def _reprobe(self, member: Member) -> None:
        # The PIN is read again: it may have changed during the outage. A wrong one fails
        # the probe's single login and the member is kept out -- never a retry loop on the PIN.
        if self._load_pin():
            self._probe_member(member)

    def _on_member_attempt(self, msg: MemberAttempt) -> None:
        member = self.members.get(msg.member)
        if (
            member is not None
            and member.state in (MemberState.LOST, MemberState.STARTING)
            and member.generation == msg.generation
            and self.state not in FINAL
        ):
            self._reprobe(member)

    def _on_probe(self, res: ProbeResult) -> None:
        member = self.members.get(res.member)
        if member is None or res.generation != member.generation or self.state in FINAL:
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
            "error": None if res.error is None else short(res.error),
            "token_label": res.info.get("token_label"),
            "serial": res.info.get("serial"),
        }
        self.last_probe = {**member.last_probe, "member": member.name}
        if res.ok and res.fresh:
            member.pin_proven = member.generation  # the probe logged in with the PIN
            if not self._same_token(member, res.info.get("token")):
                if res.host is not None:
                    res.host.kill()
                return
            if member.state in (MemberState.STARTING, MemberState.LOST):
                if member.state == MemberState.LOST:
                    for outage in (member.outage, self.outage):
                        if outage is not None:
                            outage.answered(res.started)
                    member.state = MemberState.RECOVERING
                    log.info(
                        "member %s answers again (generation %d, probe %.3f s); starting its workers",
                        member.name,
                        member.generation,
                        res.latency_s,
                    )
                self._start_workers(member, res.host)
            elif res.host is not None:
                res.host.kill()
        elif self._keeps_out(member, res.error):
            assert res.error is not None
            self._keep_out(member, str(res.error), res.error)
        elif res.ok:
            # The member answers: the signals before this probe were the workers' or the
            # jobs' own (the probe retried once before a failure became its verdict).
            self._release_held(member, res.started, res.host_loaded_at)
            if member.state == MemberState.SUSPECT:
                member.state = MemberState.SERVING
                self._refresh(f"probe of {member.name} OK: false alarm")
            for slot in self._member_slots(member):
                if slot.status == SlotState.SUSPECT:
                    log.info("probe OK: renewing worker %d only (one_for_one)", slot.wid)
                    self._schedule_renew(slot)
        elif res.fresh and (
            member.state == MemberState.LOST
            or (member.state == MemberState.STARTING and not is_loss(res.error) and member.attempt < 3)
        ):
            if self._gave_up(res.error):
                return
            member.attempt += 1
            delay = self._backoff(member.attempt)
            log.debug("probe %d of %s failed (%s); next in %.3f s", member.attempt, member.name, res.error, delay)
            self._prestart(member)
            self._after(delay, MemberAttempt(member.name, member.generation))
        else:
            cause = res.cause or ("start" if res.fresh else "periodic")
            self._lose_member(member, f"probe of {member.name} failed ({cause}): {short(res.error)}", res.error)

    # -- members ------------------------------------------------------------------------

    def _keep_out(self, member: Member, reason: str, error: BaseException) -> None:
        if member.state == MemberState.OUT:
            return
        member.state, member.reason = MemberState.OUT, reason
        self._stop_slots(self._member_slots(member))
        self._requeue_held(member)
        log.error("member %s kept out: %s", member.name, reason)
        if all(m.state == MemberState.OUT for m in self.members.values()):
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
        if self.state in DISPATCHING and not others:
            self._begin_recovery(cause)
            return
        member.state, member.reason = MemberState.LOST, cause
        member.generation += 1
        member.attempt = 0
        member.losses += 1
        self.counters.member_losses += 1
        if member.outage is None:
            member.outage = Outage.begin(cause, member.generation - 1)
        log.warning("member %s lost (member generation %d): %s", member.name, member.generation, cause)
        self._stop_slots(self._member_slots(member))
        self._requeue_held(member)
        self._prestart(member)
        self._after_member_change(member, cause, error)
        if self.state not in FINAL:
            self._after(self._backoff(1), MemberAttempt(member.name, member.generation))

    def _after_member_change(self, member: Member, cause: str, error: BaseException | None) -> None:
        """A member left service: fail a start that nothing else can carry, refresh the state."""
        if self.state == State.STARTING and not any(m.in_service for m in self.members.values()):
            # Guard() raises ``error`` itself: the caller sees what is wrong (PIN, label, module).
            single = len(self.members) == 1
            self._fail(str(error) if single and error else f"no member of the group answers at start: {cause}", error)
        elif self.state in DISPATCHING and not any(m.in_service for m in self.members.values()):
            self._begin_recovery(cause)
        else:
            self._refresh(f"member {member.name} {member.state}: {cause}")
            self._check_started()

    def _end_member_outage(self, member: Member) -> None:
        if member.outage is None:
            return
        member.outage.finish()
        member.outages.append(member.outage)
        member.outage = None
        member.recoveries += 1
        self.counters.member_recoveries += 1
        log.info("member %s serves again after %.3f s", member.name, member.outages[-1].duration_s)

    # -- the whole group ----------------------------------------------------------------

    def _begin_recovery(self, cause: str) -> None:
        if self.state in (State.LOST, State.RECOVERING, *FINAL):
            return  # single flight
        self.outage = Outage.begin(cause, self.generation)
        self.shared.outage_cause = cause
        self._set_state(State.LOST, cause)
        self._stop_slots(list(self.slots.values()))
        for member in self.members.values():
            self._requeue_held(member)
        self.effects.kill_all_hosts()  # the probe hosts too: nothing of this generation survives
        if self.closing:
            self._fail_queue(GuardClosed("the guard closed while the group was lost"))
            self._maybe_closed()
            return
        if self.config.policy == "fail_fast":  # nothing waits for the group: answer now
            for job in self.queue.drain():
                self._settle(job, error=OutOfService(str(self.state), job.op))
        self.generation += 1
        self.shared.generation = self.generation
        self._next_wid = 0
        self._set_state(State.RECOVERING, f"new generation {self.generation}")
        # Every member is probed afresh; the first to answer brings the group back, the
        # others follow as they answer.
        members = [m for m in self.members.values() if m.state != MemberState.OUT]
        for member in members:
            if member.outage is None:
                member.outage = Outage.begin(cause, member.generation)
            member.state, member.reason, member.attempt = MemberState.LOST, cause, 0
            member.generation += 1
        if self._load_pin():
            for member in members:
                self._prestart(member)
                self._probe_member(member)

    def _gave_up(self, error: BaseException | None) -> bool:
        """FAILED once the group has been lost for ``recovery.give_up_after_s`` (if set)."""
        limit = self.config.give_up_after_s
        if limit is None or self.outage is None or self.state != State.RECOVERING:
            return False
        lost_s = time.monotonic() - self.outage.start_mono
        if lost_s < limit:
            return False
        self._fail(
            f"the group has not answered for {lost_s:.1f} s (recovery.give_up_after_s = {limit:g}); "
            f"last error: {short(error)}",
            error,
        )
        return True

    def _end_outage(self) -> None:
        if self.outage is None:
            return
        self.outage.finish()
        self.outages.append(self.outage)
        self.counters.recoveries += 1
        self.shared.recoveries = self.counters.recoveries
        self.shared.outage_cause = None
        log.info(
            "recovered: generation %d serving after %.3f s (cause: %s)",
            self.generation,
            self.outage.duration_s,
            self.outage.cause,
        )
        self.outage = None
