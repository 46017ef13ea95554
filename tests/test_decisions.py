"""The supervisor's decisions, in-process and in milliseconds (no process, no PKCS#11).

Every transition of the state machine is driven message by message through a
:class:`decisions.Rig`, whose effects are recorded; the same decisions are exercised
against real processes and a real network testbed in ``test_supervision.py``.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from decisions import Rig, Worker, make_config

from p11guard import (
    AuthError,
    GroupLossError,
    GuardClosed,
    GuardFailed,
    HostCrashed,
    InternalError,
    ModuleLoadError,
    OpTimeout,
    OutcomeUnknown,
    OutOfService,
    UserError,
)
from p11guard.actors import Job, JobDone, ProbeResult, Renew, Report, RunJob, StartProbe, WorkerFailed, WorkerReady
from p11guard.base import RemoteError, poll_until
from p11guard.supervisor import (
    AdmissionQueue,
    Close,
    MemberAttempt,
    MemberState,
    SlotState,
    State,
    StatusRequest,
    SupervisorTick,
    frame_share,
    refusal,
)


def loss(op: str = "sign") -> GroupLossError:
    return GroupLossError("lost", kind="group_loss", ckr=0x30, name="CKR_DEVICE_ERROR", op=op)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(make_config(tmp_path))


def test_start_probe_then_workers_then_serving(rig: Rig) -> None:
    assert rig.sup.state == State.STARTING
    (probe,) = rig.effects.health["default"].of(StartProbe)
    assert probe.generation == 0 and not probe.handover
    rig.probe()
    assert [w.wid for w in rig.effects.workers] == [0, 1] and not rig.started.done()
    rig.ready(rig.effects.workers[:1])
    assert rig.sup.state == State.SERVING and not rig.started.done()  # one worker still starting
    rig.ready(rig.effects.workers[1:])
    assert rig.started.result(0) is None and rig.shared.members_serving == 1


def test_wrong_pin_at_start_fails_once_and_is_never_retried(rig: Rig) -> None:
    error = AuthError("login refused", kind="auth", ckr=0xA0, name="CKR_PIN_INCORRECT")
    rig.probe(ok=False, error=error)
    assert rig.sup.state == State.FAILED and rig.sup.counters.login_failures == 1
    with pytest.raises(AuthError):
        rig.started.result(0)
    assert rig.effects.workers == [] and rig.effects.scheduled == []  # no retry, no worker login
    job = rig.job()
    rig.sup._on_submit(job)
    with pytest.raises(GuardFailed, match="CKR_PIN_INCORRECT"):
        job.future.result(0)


def test_loss_signal_then_probe_answers_renews_only_that_worker(rig: Rig) -> None:
    rig.serve()
    job = rig.job()
    rig.sup._on_submit(job)
    w = next(w for w in rig.effects.workers if w.ref.of(RunJob))
    rig.send(JobDone(w.wid, 0, job, error=loss()))
    assert rig.sup.state == State.SUSPECT  # the only member is suspect
    assert rig.sup.members["default"].state == MemberState.SUSPECT
    (report,) = rig.effects.health["default"].of(Report)
    assert report.wid == w.wid
    rig.probe(fresh=False)  # the probe answers: a false alarm
    assert rig.sup.state == State.SERVING and rig.sup.generation == 0
    assert [type(m) for m in w.ref.told if isinstance(m, Renew)] == [Renew]
    others = [x for x in rig.effects.workers if x is not w]
    assert all(not x.ref.of(Renew) for x in others)
    assert "all" not in rig.effects.kills
    # the job went back to the queue and then to the other (idle) worker: retried, not failed
    assert not job.future.done() and any(m.job is job for x in others for m in x.ref.of(RunJob))


def test_probe_fails_group_recovers_with_a_new_generation(rig: Rig) -> None:
    rig.serve()
    old = list(rig.effects.workers)
    job, generate = rig.job(), rig.job("generate_key_pair", idempotent=False)
    rig.sup._on_submit(job)
    rig.sup._on_submit(generate)
    by_job = {m.job.seq: w for w in old for m in w.ref.of(RunJob)}
    rig.send(JobDone(by_job[job.seq].wid, 0, job, error=loss()))
    rig.probe(ok=False, error=loss("probe"), fresh=False)
    assert rig.sup.state == State.RECOVERING and rig.sup.generation == 1
    assert "all" in rig.effects.kills and all(w.ref.stopped for w in old)
    # the token-changing job in flight: never retried blindly
    rig.send(JobDone(by_job[generate.seq].wid, 0, generate, error=HostCrashed("killed")))
    with pytest.raises(OutcomeUnknown, match="generate_key_pair"):
        generate.future.result(0)
    # the group answers again: one fresh probe, new workers of generation 1
    rig.probe()
    new = rig.current()
    assert new and all(w.generation == 1 for w in new) and new[0].given is None
    rig.ready(new)
    assert rig.sup.state == State.SERVING and rig.sup.counters.recoveries == 1
    # the idempotent job is retried on the new generation only
    assert any(m.job is job for w in new for m in w.ref.of(RunJob))
    assert len(rig.sup.outages) == 1 and "CKR_DEVICE_ERROR" in rig.sup.outages[0].cause


def test_stale_generation_messages_change_nothing(rig: Rig) -> None:
    rig.serve()
    old = list(rig.effects.workers)
    rig.probe(ok=False, error=loss("probe"), fresh=False)
    assert rig.sup.generation == 1
    rig.probe()
    rig.ready(rig.current())
    state, slots = rig.sup.state, dict(rig.sup.slots)
    stale = rig.job()
    rig.send(JobDone(old[0].wid, 0, stale, error=loss()))  # from a worker of generation 0
    rig.send(JobDone(old[1].wid, 0, rig.job(), result=b"sig"))
    rig.send(WorkerReady(old[0].wid, 0, 1, 1))
    assert rig.sup.state == state == State.SERVING and rig.sup.slots == slots
    assert rig.sup.generation == 1 and rig.sup.counters.recoveries == 1
    assert not rig.effects.health["default"].of(Report)[1:]  # no report counted for generation 0


def test_member_loss_is_not_a_group_loss(tmp_path: Path) -> None:
    rig = Rig(make_config(tmp_path, members=2, workers=4))
    rig.serve()
    assert rig.sup.state == State.SERVING and rig.shared.members_serving == 2
    rig.probe("m0", ok=False, error=loss("probe"), fresh=False)
    m0 = rig.sup.members["m0"]
    assert m0.state == MemberState.LOST and m0.generation == 1
    assert rig.sup.state == State.SERVING and rig.sup.generation == 0 and "all" not in rig.effects.kills
    assert any(isinstance(m, MemberAttempt) and m.member == "m0" for _, m in rig.effects.scheduled)
    # the other member goes too: now it is the group
    rig.probe("m1", ok=False, error=loss("probe"), fresh=False)
    assert rig.sup.state == State.RECOVERING and rig.sup.generation == 1 and "all" in rig.effects.kills


def test_fail_fast_answers_at_once_queue_waits(tmp_path: Path) -> None:
    for policy in ("fail_fast", "queue"):
        rig = Rig(make_config(tmp_path, policy=policy))
        rig.serve()
        rig.probe(ok=False, error=loss("probe"), fresh=False)
        assert rig.sup.state == State.RECOVERING
        job = rig.job()
        rig.sup._on_submit(job)
        if policy == "fail_fast":
            with pytest.raises(OutOfService, match="RECOVERING"):
                job.future.result(0)
        else:
            assert not job.future.done() and len(rig.sup.queue) == 1


def test_user_errors_are_answers_not_loss_signals(rig: Rig) -> None:
    rig.serve()
    job = rig.job()
    rig.sup._on_submit(job)
    w = next(w for w in rig.effects.workers if w.ref.of(RunJob))
    rig.send(JobDone(w.wid, 0, job, error=UserError("no key", kind="user", name="key_not_found")))
    with pytest.raises(UserError):
        job.future.result(0)
    assert rig.sup.state == State.SERVING and not rig.effects.health["default"].of(Report)


def test_close_fails_what_waits_while_lost(rig: Rig) -> None:
    rig.serve()
    rig.probe(ok=False, error=loss("probe"), fresh=False)
    job = rig.job()
    rig.sup._on_submit(job)
    closed: Future[None] = Future()
    rig.send(Close(closed))
    with pytest.raises(GuardClosed):
        job.future.result(0)
    assert closed.result(0) is None


def test_refusal_is_one_rule() -> None:
    assert refusal(State.SERVING, "fail_fast", "sign") is None
    assert refusal(State.SUSPECT, "fail_fast", "sign") is None
    assert refusal(State.LOST, "queue", "sign") is None
    assert isinstance(refusal(State.LOST, "fail_fast", "sign"), OutOfService)
    assert isinstance(refusal(State.SERVING, "queue", "sign", closing=True), GuardClosed)
    failed = refusal(State.FAILED, "queue", "sign", failed_reason="wrong PIN")
    assert isinstance(failed, GuardFailed) and "wrong PIN" in str(failed)


def test_admission_queue_order_retry_and_expiry(rig: Rig) -> None:
    queue = AdmissionQueue()
    a, b, c = rig.job(), rig.job(), rig.job(deadline_s=-1)
    queue.append(a)
    queue.append(b)
    queue.retry(c)  # back from a failed attempt: first in line
    assert [j.seq for j in queue] == [c.seq, a.seq, b.seq]
    assert queue.expired(time.monotonic()) == [c]
    assert queue.pop() is a and len(queue) == 1
    assert queue.drain() == [b] and not queue


def test_a_job_past_its_deadline_gets_op_timeout(rig: Rig) -> None:
    rig.serve()
    rig.probe(ok=False, error=loss("probe"), fresh=False)
    job = rig.job(deadline_s=-1)
    rig.sup._on_submit(job)
    rig.send(SupervisorTick())
    with pytest.raises(OpTimeout, match="op_deadline_s"):
        job.future.result(0)


def test_slot_states_are_enums(rig: Rig) -> None:
    rig.serve()
    assert {s.status for s in rig.sup.slots.values()} == {SlotState.IDLE}
    status = rig.send(StatusRequest())
    assert status["state"] == "SERVING" and {w["status"] for w in status["workers"]} == {"idle"}
    assert status["members"][0]["state"] == "serving"


# -- loss by evidence: the probe decides, not the error code -------------------------------------


def internal(op: str = "sign") -> InternalError:
    return InternalError("the module failed", kind="internal", ckr=0x5, name="CKR_GENERAL_ERROR", op=op)


def _run_one(rig: Rig, job: Job) -> Worker:
    """Submit ``job``; the worker it went to."""
    rig.sup._on_submit(job)
    return next(w for w in rig.current() if any(m.job is job for m in w.ref.of(RunJob)))


def test_a_general_error_with_a_healthy_group_costs_one_probe_and_no_recovery(rig: Rig) -> None:
    rig.serve()
    job = rig.job()
    w = _run_one(rig, job)
    rig.send(JobDone(w.wid, 0, job, error=internal()))
    assert not job.future.done()  # waits for the verdict, does not fail
    assert len(rig.effects.health["default"].of(Report)) == 1
    rig.probe(fresh=False)  # the group answers
    other = next(x for x in rig.current() if any(m.job is job for m in x.ref.of(RunJob)) and x is not w)
    rig.send(JobDone(other.wid, 0, job, result=b"sig"))
    assert job.future.result(0) == b"sig"
    assert rig.sup.generation == 0 and rig.sup.counters.recoveries == 0 and "all" not in rig.effects.kills


def test_an_error_that_is_the_requests_own_is_retried_once_then_reported(rig: Rig) -> None:
    rig.serve()
    job = rig.job()
    w = _run_one(rig, job)
    rig.send(JobDone(w.wid, 0, job, error=internal()))
    rig.probe(fresh=False)
    other = next(x for x in rig.current() if x is not w)
    rig.send(JobDone(other.wid, 0, job, error=internal()))
    assert not job.future.done()  # a second signal: the group may have gone meanwhile
    rig.probe(fresh=False)
    with pytest.raises(InternalError, match="CKR_GENERAL_ERROR"):
        job.future.result(0)
    assert job.attempts == 2 and rig.sup.generation == 0 and rig.sup.counters.recoveries == 0


def test_an_ok_from_a_probe_host_younger_than_the_jobs_host_clears_nothing(rig: Rig) -> None:
    """A TPM restarted between the workers' start and the probe host's: the probe's new
    connection answers, the workers' old ones answer CKR_GENERAL_ERROR. That is not the
    request's own error: retried until it fails on hosts the probe vouches for."""
    rig.serve()  # the rig's workers loaded the module at 0.0
    job = rig.job()
    w = _run_one(rig, job)
    rig.send(JobDone(w.wid, 0, job, error=internal()))
    probe_loaded = time.monotonic()
    rig.probe(fresh=False, host_loaded_at=probe_loaded)
    other = next(x for x in rig.current() if x is not w)
    assert job.cleared == 0 and [m.job for m in other.ref.of(RunJob)] == [job]
    rig.send(JobDone(other.wid, 0, job, error=internal()))
    rig.probe(fresh=False, host_loaded_at=probe_loaded)
    assert job.cleared == 0 and not job.future.done()  # both hosts older than the probe's: retried
    for x in (w, other):  # renewed (a new host each): loaded after the probe host
        rig.send(WorkerReady(x.wid, 0, 2000 + x.wid, 2, host_loaded_at=time.monotonic()))
    for cleared in (1, 2):
        x = next(x for x in rig.current() if job.seq in rig.sup.slots[x.wid].jobs)
        rig.send(JobDone(x.wid, 0, job, error=internal()))
        rig.probe(fresh=False, host_loaded_at=probe_loaded)
        assert job.cleared == cleared
        if cleared == 1:
            rig.send(WorkerReady(x.wid, 0, 3000 + x.wid, 3, host_loaded_at=time.monotonic()))
    with pytest.raises(InternalError, match="CKR_GENERAL_ERROR"):
        job.future.result(0)
    assert rig.sup.generation == 0 and rig.sup.counters.recoveries == 0


def test_a_session_error_is_still_the_requests_own_under_a_younger_probe_host(rig: Rig) -> None:
    """A session error questions the session, which the renewal replaces (the host stays):
    the age of the probe's host does not matter, two failures answer the caller."""
    rig.serve()
    job = rig.job()
    rig.sup._on_submit(job)
    probe_loaded = time.monotonic()  # younger than every worker's host (0.0 in the rig)
    for _ in range(2):
        slot = next(s for s in rig.sup.slots.values() if job.seq in s.jobs)
        error = RemoteError("handle gone", kind="session", ckr=0x82, name="CKR_OBJECT_HANDLE_INVALID", op="sign")
        rig.send(JobDone(slot.wid, 0, job, error=error))
        rig.probe(fresh=False, host_loaded_at=probe_loaded)
        renew = rig.sup.slots[slot.wid].ref.of(Renew)[-1]  # type: ignore[union-attr]
        assert renew.new_host is False  # a new session on the same, older host
    with pytest.raises(RemoteError, match="CKR_OBJECT_HANDLE_INVALID"):
        job.future.result(0)


def test_a_general_error_then_a_failed_probe_is_a_group_loss_and_the_job_waits(rig: Rig) -> None:
    rig.serve()
    job = rig.job()
    w = _run_one(rig, job)
    rig.send(JobDone(w.wid, 0, job, error=internal()))
    rig.probe(ok=False, error=internal("probe"), fresh=False)  # any probe failure is the verdict
    assert rig.sup.state == State.RECOVERING and not job.future.done()
    rig.probe(ok=False, error=ModuleLoadError("C_Initialize failed", kind="internal", ckr=0x5))
    assert rig.sup.state == State.RECOVERING  # after serving, a failed start is a loss: retried
    assert any(isinstance(m, MemberAttempt) for _, m in rig.effects.scheduled)
    rig.probe()
    rig.ready(rig.current())
    assert any(m.job is job for x in rig.current() for m in x.ref.of(RunJob))  # retried on generation 1


def test_a_verdict_covers_only_the_signals_before_its_probe_began(rig: Rig) -> None:
    rig.serve()
    early = rig.job()
    w = _run_one(rig, early)
    rig.send(JobDone(w.wid, 0, early, error=internal()))
    before = time.monotonic()
    late = rig.job()
    other = _run_one(rig, late)
    rig.send(JobDone(other.wid, 0, late, error=internal()))
    m = rig.sup.members["default"]
    rig.send(ProbeResult(m.generation, True, time.time(), 0.001, fresh=False, started=before))
    assert early.cleared == 1 and late.cleared == 0 and [h.job for h in m.held] == [late]


def test_a_pin_error_after_serving_is_still_never_retried(rig: Rig) -> None:
    rig.serve()
    rig.probe(ok=False, error=internal("probe"), fresh=False)
    rig.probe(ok=False, error=AuthError("login refused", kind="auth", ckr=0xA0, name="CKR_PIN_INCORRECT"))
    assert rig.sup.state == State.FAILED and rig.sup.counters.login_failures == 1


def test_a_batch_with_a_signal_item_is_held_then_answered_item_by_item(rig: Rig) -> None:
    rig.serve()
    job = rig.job("batch")
    w = _run_one(rig, job)
    results = [b"a", internal(), b"c"]
    rig.send(JobDone(w.wid, 0, job, result=results, error=results[1]))
    rig.probe(fresh=False)
    other = next(x for x in rig.current() if x is not w)
    rig.send(JobDone(other.wid, 0, job, result=results, error=results[1]))
    rig.probe(fresh=False)
    assert job.future.result(0) == results  # the good items signed, the bad one its own error


def test_fail_fast_answers_held_work_at_a_loss(tmp_path: Path) -> None:
    rig = Rig(make_config(tmp_path, policy="fail_fast"))
    rig.serve()
    job = rig.job()
    w = _run_one(rig, job)
    rig.send(JobDone(w.wid, 0, job, error=internal()))
    rig.probe(ok=False, error=internal("probe"), fresh=False)
    with pytest.raises(OutOfService):
        job.future.result(0)


def test_give_up_after_s_ends_a_recovery_that_never_comes(tmp_path: Path) -> None:
    rig = Rig(make_config(tmp_path, give_up_after_s=0.001))
    rig.serve()
    rig.probe(ok=False, error=internal("probe"), fresh=False)
    assert rig.sup.state == State.RECOVERING
    job = rig.job()
    rig.sup._on_submit(job)
    poll_until(lambda: time.monotonic() - rig.sup.outage.start_mono > 0.001, 1, "the limit")  # type: ignore[union-attr]
    rig.probe(ok=False, error=internal("probe"))
    assert rig.sup.state == State.FAILED and "give_up_after_s" in (rig.sup.failed_reason or "")
    with pytest.raises(GuardFailed, match="give_up_after_s"):
        job.future.result(0)


def test_without_give_up_a_recovery_retries_for_ever(rig: Rig) -> None:
    rig.serve()
    rig.probe(ok=False, error=internal("probe"), fresh=False)
    for _ in range(20):
        rig.probe(ok=False, error=internal("probe"))
    assert rig.sup.state == State.RECOVERING
    assert sum(isinstance(m, MemberAttempt) for _, m in rig.effects.scheduled) == 20


def test_a_worker_pin_error_after_the_probe_proved_the_pin_is_renewed_once(rig: Rig) -> None:
    """tpm2-pkcs11 answers CKR_PIN_INCORRECT when the TPM cannot unseal, right after a restart."""
    pin_error = AuthError("login refused", kind="auth", ckr=0xA0, name="CKR_PIN_INCORRECT")
    rig.probe()  # the probe logged in with the PIN
    w = rig.effects.workers[0]
    rig.send(WorkerFailed(w.wid, 0, pin_error))
    assert rig.sup.members["default"].state != MemberState.OUT
    assert [m for m in w.ref.told if isinstance(m, Renew)] != []  # renewed, once
    rig.send(WorkerFailed(w.wid, 0, pin_error))  # again: now it is the PIN
    assert rig.sup.members["default"].state == MemberState.OUT and rig.sup.state == State.FAILED


def test_token_changing_jobs_are_serialised_per_label(rig: Rig) -> None:
    rig.serve()
    first, second, other = rig.job("generate_key_pair", False), rig.job("generate_key_pair", False), rig.job()
    for job in (first, second, other):
        rig.sup._on_submit(job)
    running = [m.job for w in rig.effects.workers for m in w.ref.of(RunJob)]
    assert first in running and other in running and second not in running  # same label "k": waits
    w = next(w for w in rig.effects.workers if any(m.job is first for m in w.ref.of(RunJob)))
    rig.send(JobDone(w.wid, 0, first, result={"label": "k"}))
    assert any(m.job is second for x in rig.effects.workers for m in x.ref.of(RunJob))


def test_token_identity_is_recorded_then_checked(tmp_path: Path) -> None:
    from p11guard.supervisor._identity import token_mismatch
    from p11guard.supervisor._states import Member

    config = make_config(tmp_path)
    member = Member("hsm-a", config, 1)
    ours = {"label": "t", "serial": "1111", "manufacturer": "SoftHSM project", "model": "SoftHSM v2"}
    assert token_mismatch(member, ours, ()) is None and member.identity == ours
    assert token_mismatch(member, dict(ours), ()) is None
    other = token_mismatch(member, {**ours, "serial": "2222"}, ())
    assert other is not None and "expected serial '1111'" in str(other) and "found serial '2222'" in str(other)
    assert token_mismatch(member, {"label": "t"}, ()) is None  # a module that names no serial cannot be checked
    assert token_mismatch(member, {**ours, "serial": "  "}, ()) is None  # nor a blank one
    assert token_mismatch(member, {**ours, "label": ""}, ()) is None  # a field read blank is no evidence
    relabelled = token_mismatch(member, {**ours, "label": "other"}, ())
    assert relabelled is not None and "label 't', now 'other'" in str(relabelled)
    fresh = Member("hsm-b", config, 1)
    pinned = token_mismatch(fresh, ours, ("9999",))
    assert pinned is not None and "not one of group.serials ['9999']" in str(pinned) and fresh.identity is None


# -- coalescing single operations into frames -----------------------------------------------------


def test_a_lone_callers_op_goes_at_once_alone(rig: Rig) -> None:
    rig.serve()
    job = rig.job()
    rig.sup._on_submit(job)  # dispatched inside the submit: no timer, no waiting for company
    (run,) = [m for w in rig.effects.workers for m in w.ref.of(RunJob)]
    assert run.job is job and run.more == ()


def test_waiting_single_ops_share_a_frame_each_with_its_own_answer(rig: Rig) -> None:
    rig.serve()
    first, second = rig.job(), rig.job()
    rig.sup._on_submit(first)
    rig.sup._on_submit(second)  # both workers busy now
    waiting = [rig.job() for _ in range(6)]
    generate = rig.job("generate_key_pair", idempotent=False)
    for job in [*waiting, generate]:
        rig.sup._on_submit(job)
    assert len(rig.sup.queue) == 7
    w, other = (next(x for x in rig.current() if any(m.job is j for m in x.ref.of(RunJob))) for j in (first, second))
    rig.send(JobDone(w.wid, 0, first, result=b"1"))
    frame = w.ref.of(RunJob)[-1]
    assert [frame.job, *frame.more] == waiting[:4]  # its share: 8 ops of work on 2 workers
    rig.send(JobDone(other.wid, 0, second, result=b"2"))
    frame = other.ref.of(RunJob)[-1]
    assert [frame.job, *frame.more] == waiting[4:]  # the token-changing op is never coalesced
    outcomes = [b"ok"] * 6
    rig.send(JobDone(w.wid, 0, waiting[0], result=b"ok"))
    rig.send(JobDone(w.wid, 0, waiting[1], error=UserError("no key", kind="user", name="key_not_found")))
    for job in waiting[2:]:
        rig.send(JobDone((w if job in waiting[:4] else other).wid, 0, job, result=b"ok"))
    with pytest.raises(UserError):
        waiting[1].future.result(0)
    assert [j.future.result(0) for j in waiting if j is not waiting[1]] == outcomes[:5]
    assert w.wid in rig.sup.idle or any(m.job is generate for m in w.ref.of(RunJob))


def test_a_loss_in_the_middle_of_a_frame_retries_idempotent_ops_exactly_once(rig: Rig) -> None:
    rig.serve()
    first, second = rig.job(), rig.job()
    rig.sup._on_submit(first)
    rig.sup._on_submit(second)
    waiting = [rig.job() for _ in range(4)]
    for job in waiting:
        rig.sup._on_submit(job)
    w = next(w for w in rig.effects.workers if any(m.job is first for m in w.ref.of(RunJob)))
    rig.send(JobDone(w.wid, 0, first, result=b"1"))
    frame = w.ref.of(RunJob)[-1]
    assert len(frame.more) == 2  # its share: 5 ops of work on 2 workers
    crash = HostCrashed("host killed by SIGKILL during batch")
    for job in (frame.job, *frame.more):  # the frame's host died: every op of it meets the same signal
        rig.send(JobDone(w.wid, 0, job, error=crash))
    assert len(rig.effects.health["default"].of(Report)) == 1  # one suspicion per frame
    rig.probe(ok=False, error=loss("probe"), fresh=False)  # the group is lost
    rig.probe()
    new = rig.current()
    rig.ready(new)
    runs = [m for x in new for m in x.ref.of(RunJob)]
    again = [j for m in runs for j in (m.job, *m.more)]
    assert sorted(j.seq for j in again if j in waiting) == sorted(j.seq for j in waiting)  # each once
    assert not any(j.future.done() for j in waiting)


def test_a_frame_takes_its_workers_share_and_leaves_the_rest_to_the_others(tmp_path: Path) -> None:
    """256 in flight on 16 workers of a latency-bound HSM: frames of 64 kept 4 hosts busy."""
    rig = Rig(make_config(tmp_path, workers=4))
    rig.serve()
    busy = [rig.job() for _ in range(4)]
    for job in busy:
        rig.sup._on_submit(job)  # one each, at once
    waiting = [rig.job() for _ in range(16)]
    for job in waiting:
        rig.sup._on_submit(job)
    freed = [next(x for x in rig.current() if any(m.job is j for m in x.ref.of(RunJob))) for j in busy]
    sizes = []
    for x, job in zip(freed, busy, strict=True):
        rig.send(JobDone(x.wid, 0, job, result=b"ok"))
        frame = x.ref.of(RunJob)[-1]
        sizes.append(1 + len(frame.more))
    assert sizes == [5, 5, 5, 1] and not rig.sup.queue  # 20 ops of work on 4 workers: 5 each, not 16 on one
    assert frame_share(256, 16, 64) == 16 and frame_share(256, 2, 64) == 64 and frame_share(0, 0, 64) == 1


def test_the_books_keep_the_last_outages_and_count_them_all(rig: Rig) -> None:
    from p11guard.supervisor._states import OUTAGES_KEPT

    rig.serve()
    for _ in range(OUTAGES_KEPT + 20):
        rig.probe(ok=False, error=loss("probe"), fresh=False)
        rig.probe()
        rig.ready(rig.current())
    status = rig.send(StatusRequest())
    assert status["counters"]["recoveries"] == OUTAGES_KEPT + 20 and len(status["outages"]) == OUTAGES_KEPT


def test_a_loss_code_is_never_the_requests_own_however_often_the_probe_answers(rig: Rig) -> None:
    """Flapping: the probe's connection did not live through the blips, the workers' did."""
    rig.serve()
    job = rig.job()
    rig.sup._on_submit(job)
    for _ in range(5):
        slot = next(s for s in rig.sup.slots.values() if job.seq in s.jobs)
        rig.send(JobDone(slot.wid, 0, job, error=loss()))
        rig.probe(fresh=False)  # the probe answers: that worker is renewed, the job retried
        rig.ready([w for w in rig.current() if rig.sup.slots[w.wid].status == SlotState.RENEWING])
    assert not job.future.done() and job.cleared == 0 and job.attempts == 6
