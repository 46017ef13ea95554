"""Supervision against the testbed: real p11-kit RPC over SoftHSM2, real host processes."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from conftest import EC_KEY, NOT_SERVING, Load, gone, guard, progress_after, state_in, wait_until
from p11guard import (
    AuthError,
    Config,
    ConfigError,
    GroupLossError,
    Guard,
    GuardClosed,
    GuardFailed,
    ModuleLoadError,
    OutcomeUnknown,
    OutOfService,
)
from p11guard.protocol import encode
from p11guard.testbed import Testbed


def test_total_loss_under_load(net_config: Config, group: Testbed) -> None:
    with guard(net_config.replace(workers=4)) as g, Load(g) as load:
        pem = g.public_key(EC_KEY)
        group.fault("lose")
        wait_until(lambda: state_in(g, "LOST", "RECOVERING"), 10, "LOST")
        group.fault("restore")
        wait_until(lambda: g.state == "SERVING" and g.generation == 1, 15, "recovery")
        progress_after(load)
        status = g.status()
    assert load.errors == []
    load.verify_all(pem)
    assert status["generation"] == 1 and status["counters"]["recoveries"] == 1


def test_total_loss_status_and_single_generation(net_config: Config, group: Testbed) -> None:
    with guard(net_config.replace(workers=3)) as g, Load(g, threads=4) as load:
        group.fault("lose")
        wait_until(lambda: state_in(g, "RECOVERING"), 10, "RECOVERING")
        group.fault("restore")
        wait_until(lambda: g.state == "SERVING", 15, "SERVING")
        progress_after(load)
        status = g.status()
    assert load.errors == []
    assert status["generation"] == 1 and status["counters"]["recoveries"] == 1
    assert len(status["outages"]) == 1
    outage = status["outages"][0]
    assert outage["duration_s"] > 0 and outage["end"] > outage["start"]
    assert "CKR_DEVICE_ERROR" in outage["cause"]
    assert all(w["generation"] == 1 for w in status["workers"])


def test_hang_kills_hosts_and_recovers(net_config: Config, group: Testbed) -> None:
    config = net_config.replace(call_s=1.0, probe_s=0.5)
    with guard(config) as g, Load(g, threads=4) as load:
        before = [pid for name, pid in g.host_pids().items() if name.startswith("worker")]
        group.fault("hang")
        wait_until(lambda: state_in(g, "RECOVERING"), 10, "RECOVERING after a hang")
        for pid in before:
            wait_until(lambda pid=pid: gone(pid), 5, "hung hosts to be killed")
        group.fault("restore")
        wait_until(lambda: g.state == "SERVING", 15, "SERVING")
        progress_after(load)
    assert load.errors == []


def _worker(g: Guard, wid: int) -> dict:
    return next(w for w in g.status()["workers"] if w["id"] == wid)


def _hit_all_workers(g: Guard, n: int = 40) -> list[Future[bytes]]:
    futures = [g.submit_sign(EC_KEY, b"%d" % i) for i in range(n)]
    for f in futures:
        f.result(30)
    return futures


@pytest.mark.parametrize("ckr", [0xB3, 0x30])
def test_false_alarm_renews_only_that_worker(net_config: Config, group: Testbed, ckr: int) -> None:
    with guard(net_config) as g:
        _hit_all_workers(g)
        w0, w1 = _worker(g, 0), _worker(g, 1)
        g.inject_fault(0, "fail_next", ckr=ckr, count=1, ops=["sign"])
        _hit_all_workers(g)  # one of them meets the injected error and is retried
        wait_until(
            lambda: _worker(g, 0)["restarts"] == 1 and _worker(g, 0)["status"] == "idle",
            10,
            "worker 0 renewed",
        )
        status = g.status()
        assert status["generation"] == 0 and status["state"] == "SERVING"
        assert status["counters"]["ops_failed"] == 0 and status["counters"]["ops_retried"] == 1
        new0, new1 = _worker(g, 0), _worker(g, 1)
        assert new1["pid"] == w1["pid"] and new1["restarts"] == 0  # untouched
        if ckr == 0xB3:  # session error, host fine: a new session in the same host
            assert new0["pid"] == w0["pid"] and new0["sessions_opened"] == w0["sessions_opened"] + 1
        else:  # device error, group fine: a new host for that worker only
            assert new0["pid"] != w0["pid"]
        assert status["last_probe"]["ok"] is True


def test_sigkill_one_worker_host(net_config: Config, group: Testbed) -> None:
    with guard(net_config.replace(workers=3)) as g:
        before = {w["id"]: w["pid"] for w in g.status()["workers"]}
        restarts = _find(g.status(), 1)["restarts"]  # a spurious start-up error may have cost one
        with Load(g, threads=6) as load:
            os.kill(before[1], signal.SIGKILL)
            wait_until(
                lambda: (
                    _find(g.status(), 1)["pid"] not in (None, before[1])
                    and _find(g.status(), 1)["status"] in ("idle", "busy")
                ),
                10,
                "worker 1 to serve from a new host",
            )
            progress_after(load)
            status = g.status()
    assert load.errors == []
    assert status["generation"] == 0
    assert _find(status, 0)["pid"] == before[0] and _find(status, 2)["pid"] == before[2]
    assert _find(status, 1)["restarts"] == restarts + 1


def _find(status: dict, wid: int) -> dict:
    return next(w for w in status["workers"] if w["id"] == wid)


def test_flapping_converges_single_flight(net_config: Config, group: Testbed) -> None:
    transitions: list[tuple[str, str]] = []
    with guard(net_config) as g:
        g.on_state_change(lambda old, new, info: transitions.append((old, new)))
        with Load(g, threads=4) as load:
            for _ in range(5):
                group.fault("lose")
                wait_until(lambda: state_in(g, *NOT_SERVING), 10, "loss noticed")
                group.fault("restore")
            wait_until(lambda: g.state == "SERVING", 20, "SERVING")
            progress_after(load)
        status = g.status()
    assert load.errors == []
    losts = [t for t in transitions if t[1] == "LOST"]
    # every LOST is followed by exactly one RECOVERING before the next LOST: never two at once
    assert status["generation"] == len(losts) >= 1
    allowed = {
        ("SERVING", "SUSPECT"),
        ("SUSPECT", "SERVING"),
        ("SUSPECT", "LOST"),
        ("SERVING", "LOST"),
        ("LOST", "RECOVERING"),
        ("RECOVERING", "SERVING"),
        ("SERVING", "CLOSED"),
    }
    assert set(transitions) <= allowed, transitions


def test_wrong_pin_after_outage_fails_once(net_config: Config, group: Testbed, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(group.pin.reveal())
    with guard(net_config.replace(pin_file=str(pin_file))) as g:
        g.sign(EC_KEY, b"before")
        pin_file.write_text("9999-wrong-pin")  # changed while serving: read only at recovery
        group.fault("lose")
        wait_until(lambda: state_in(g, "RECOVERING"), 10, "RECOVERING")
        waiting = g.submit_sign(EC_KEY, b"waits through the outage")
        group.fault("restore")
        wait_until(lambda: g.state == "FAILED", 15, "FAILED")
        status = g.status()
        assert status["counters"]["login_failures"] == 1
        assert "CKR_PIN_INCORRECT" in status["failed_reason"]
        assert "9999-wrong-pin" not in str(status)
        with pytest.raises(GuardFailed, match="CKR_PIN_INCORRECT"):
            waiting.result(10)
        assert g.host_pids() == {}  # nothing left that could retry the login
        with pytest.raises(GuardFailed):
            g.sign(EC_KEY, b"after")


def test_fail_fast_policy(net_config: Config, group: Testbed) -> None:
    with guard(net_config.replace(policy="fail_fast")) as g:
        g.sign(EC_KEY, b"ok")
        group.fault("lose")
        wait_until(lambda: state_in(g, "LOST", "RECOVERING"), 10, "LOST")
        with pytest.raises(OutOfService, match="out of service"):
            g.sign(EC_KEY, b"refused")
        group.fault("restore")
        wait_until(lambda: g.state == "SERVING", 15, "SERVING")
        assert g.sign(EC_KEY, b"ok again")


def test_in_flight_generate_is_outcome_unknown_sign_is_retried(net_config: Config, group: Testbed) -> None:
    with guard(net_config) as g:
        pem = g.public_key(EC_KEY)
        for wid in (0, 1):
            g.inject_fault(wid, "hang", seconds=1.0)
        label = f"inflight-{os.getpid()}"
        gen = g.submit_generate_key_pair(label, "ec-p256")
        sign = g.submit_sign(EC_KEY, b"in flight")
        wait_until(lambda: g.status()["in_flight"] == 2, 5, "both ops in flight")
        group.fault("lose")
        wait_until(lambda: state_in(g, "RECOVERING"), 10, "RECOVERING")
        group.fault("restore")
        with pytest.raises(OutcomeUnknown, match=f"generate_key_pair\\('{label}'\\)"):
            gen.result(20)
        sig = sign.result(20)
        pub = load_pem_public_key(pem)
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(sig, b"in flight", ec.ECDSA(hashes.SHA256()))
        assert g.status()["counters"]["outcome_unknown"] == 1
        g.destroy(label)  # whatever happened on the token


def test_old_generation_never_reaches_new_hosts(net_config: Config, group: Testbed) -> None:
    with guard(net_config) as g:
        g.sign(EC_KEY, b"gen 0")
        group.fault("lose")
        wait_until(lambda: state_in(g, "RECOVERING"), 10, "RECOVERING")
        group.fault("restore")
        wait_until(lambda: g.state == "SERVING", 15, "SERVING")
        hosts = g._registry.hosts()
        assert hosts and all(h.generation == 1 for h in hosts)
        reply = hosts[0].send_raw(encode({"id": 99, "gen": 0, "op": "sign", "args": {"key": EC_KEY, "data": b"stale"}}))
        assert reply["err"]["kind"] == "stale_generation"


def test_close_during_outage_completes_every_future(net_config: Config, group: Testbed) -> None:
    g = Guard(net_config)
    pids = list(g.host_pids().values())
    try:
        group.fault("lose")
        wait_until(lambda: state_in(g, "RECOVERING"), 10, "RECOVERING")
        waiting = [g.submit_sign(EC_KEY, b"%d" % i) for i in range(10)]
    finally:
        g.close()
    for f in waiting:
        assert f.done()
        with pytest.raises(GuardClosed):
            f.result(0)
    assert g.host_pids() == {}
    for pid in pids:
        wait_until(lambda pid=pid: gone(pid), 5, "hosts gone")
    with pytest.raises(GuardClosed):
        g.sign(EC_KEY, b"after close")


def test_queue_full_applies_backpressure(net_config: Config, group: Testbed) -> None:
    with guard(net_config.replace(queue_max=4)) as g:
        group.fault("lose")
        wait_until(lambda: state_in(g, "RECOVERING"), 10, "RECOVERING")
        futures = [g.submit_sign(EC_KEY, b"%d" % i) for i in range(4)]
        blocked = threading.Event()
        extra: list[Future[bytes]] = []

        def submit() -> None:
            extra.append(g.submit_sign(EC_KEY, b"fifth"))
            blocked.set()

        t = threading.Thread(target=submit, daemon=True)
        t.start()
        assert not blocked.wait(0.3)  # the fifth submit waits for queue space
        group.fault("restore")
        assert blocked.wait(20)
        assert all(len(f.result(20)) > 0 for f in [*futures, *extra])


def test_start_errors_are_clear(net_config: Config, group: Testbed, tmp_path: Path) -> None:
    bad_pin = tmp_path / "pin"
    bad_pin.write_text("bad-pin-0000")
    with pytest.raises(AuthError, match="CKR_PIN_INCORRECT"):
        Guard(net_config.replace(pin_file=str(bad_pin)))
    with pytest.raises(GroupLossError, match=f"no token labelled 'nope'.*{group.token_label}"):
        Guard(net_config.replace(token_label="nope"))
    fake = tmp_path / "fake.so"
    fake.write_bytes(b"\x7fELF garbage")
    with pytest.raises(ModuleLoadError, match="cannot load PKCS#11 module"):
        Guard(net_config.replace(module_path=str(fake)))
    with pytest.raises(ConfigError, match=r"group\.pin_file: cannot read PIN file"):
        Guard(net_config.replace(pin_file=str(tmp_path / "missing")))


def test_asyncio_and_sign_many(net_config: Config, group: Testbed) -> None:
    import asyncio

    with guard(net_config.replace(batch_size=16)) as g:
        pem = g.public_key(EC_KEY)
        items = [b"item %d" % i for i in range(100)]
        sigs = g.sign_many(EC_KEY, items)
        assert len(sigs) == 100
        pub = load_pem_public_key(pem)
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        for data, sig in zip(items, sigs, strict=True):
            pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))

        async def main() -> list[bytes]:
            return list(await asyncio.gather(*(g.asign(EC_KEY, d) for d in items[:10])))

        for data, sig in zip(items[:10], asyncio.run(main()), strict=True):
            pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        mixed = g.sign_many("no-such-key", [b"x"], return_exceptions=True)
        assert "key_not_found" in str(mixed[0])


def test_a_request_that_fails_every_host_gives_up(net_config: Config, group: Testbed) -> None:
    """The probe answers each time: the error is the request's own. One retry on another
    worker, then the error is its answer -- no churn, no recovery."""
    from p11guard import SessionError

    with guard(net_config) as g:
        for wid in (0, 1):  # every sign fails with a session error, on either worker, again and again
            g.inject_fault(wid, "fail_next", ckr=0xB3, count=100, ops=["sign"])
        with pytest.raises(SessionError, match="CKR_SESSION_HANDLE_INVALID"):
            g.sign(EC_KEY, b"poison")
        status = g.status()
        assert status["counters"]["ops_retried"] == 1
        assert status["counters"]["probes"] >= 2 and status["counters"]["recoveries"] == 0
        assert status["generation"] == 0  # the group was fine all along
        assert len(g.random(8)) == 8  # and still serves everything else


def test_every_guard_operation_direct(bed: Testbed) -> None:
    import asyncio
    import hashlib

    config = bed.client_config(direct=True)
    with guard(config) as g:
        label = f"api-{os.getpid()}"
        assert g.generate_secret(label, "aes-256")["type"] == "aes-256"
        ct = g.encrypt(label, b"plain", aad=b"hdr")
        assert g.decrypt(label, ct, aad=b"hdr") == b"plain"
        assert g.digest(b"abc") == hashlib.sha256(b"abc").digest()
        assert len(g.random(17)) == 17
        assert label in {k["label"] for k in g.list_keys()}
        assert g.destroy(label) == 1
        pem = g.public_key(EC_KEY)
        sig = g.sign(EC_KEY, b"m")
        assert g.verify(EC_KEY, b"m", sig) and not g.verify(EC_KEY, b"n", sig)
        load_pem_public_key(pem)

        async def main() -> tuple[bytes, bool, list[bytes]]:
            s = await g.asign(EC_KEY, b"a")
            return s, await g.averify(EC_KEY, b"a", s), await g.asign_many(EC_KEY, [b"1", b"2"])

        _, ok, many = asyncio.run(main())
        assert ok and len(many) == 2
        status = g.status()
        assert status["state"] == "SERVING" and status["policy"] == "queue"
        assert {"ops_ok", "ops_failed", "ops_retried", "recoveries"} <= status["counters"].keys()
        assert all({"id", "pid", "alive", "ops", "last_error"} <= w.keys() for w in status["workers"])
        assert status["last_probe"] is None or {"ok", "at", "latency_s"} <= status["last_probe"].keys()


def test_state_change_callback_errors_do_not_break_the_guard(net_config: Config, group: Testbed) -> None:
    seen: list[str] = []

    def bad(old: str, new: str, info: dict) -> None:
        seen.append(new)
        raise RuntimeError("a callback bug")

    with guard(net_config) as g:
        g.on_state_change(bad)
        group.fault("lose")
        wait_until(lambda: "RECOVERING" in seen, 10, "RECOVERING seen")
        group.fault("restore")
        wait_until(lambda: g.state == "SERVING", 15, "SERVING")
        assert g.sign(EC_KEY, b"still fine")
    assert seen[:2] in (["SUSPECT", "LOST"], ["LOST", "RECOVERING"])


def test_a_general_error_with_a_healthy_group_costs_one_probe_no_recovery(net_config: Config, group: Testbed) -> None:
    """CKR_GENERAL_ERROR is a signal, not a verdict: the probe answers, the op is retried."""
    with guard(net_config.replace(probe_interval_s=3600.0, workers=1)) as g:
        before = g.status()["counters"]
        g.inject_fault(0, "fail_next", ckr=0x5, count=1, ops=["sign"])
        sig = g.sign(EC_KEY, b"general error")  # fails, the probe answers, retried on the renewed worker
        after = g.status()
        pub = load_pem_public_key(g.public_key(EC_KEY))
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"general error", ec.ECDSA(hashes.SHA256()))
    assert after["counters"]["probes"] == before["probes"] + 1
    assert after["counters"]["recoveries"] == 0 and after["generation"] == 0
    assert after["counters"]["ops_retried"] == before["ops_retried"] + 1


def test_many_async_callers_share_frames_through_a_total_loss(net_config: Config, group: Testbed) -> None:
    """256 coroutines in flight, 4 operations each: single ops coalesce into frames, each
    caller gets its own answer, and a total loss in the middle of that flow (300 answered)
    costs no idempotent op (exactly once)."""
    import asyncio

    async def run(g: Guard) -> tuple[list[tuple[bytes, bytes]], list[BaseException]]:
        flowing = asyncio.Event()
        answered = 0

        async def one(i: int) -> list[tuple[bytes, bytes]]:
            nonlocal answered
            out = []
            for k in range(4):
                data = b"async %d-%d" % (i, k)
                out.append((data, await g.asign(EC_KEY, data)))
                answered += 1
                if answered == 300:
                    flowing.set()
            return out

        tasks = [asyncio.ensure_future(one(i)) for i in range(256)]
        await asyncio.wait_for(flowing.wait(), 60)
        group.fault("lose")
        await asyncio.to_thread(wait_until, lambda: g.state == "RECOVERING", 10, "the loss")
        group.fault("restore")
        done = await asyncio.gather(*tasks, return_exceptions=True)
        signed = [pair for d in done if isinstance(d, list) for pair in d]
        return signed, [d for d in done if isinstance(d, BaseException)]

    with guard(net_config.replace(workers=2, batch_size=32)) as g:
        signed, errors = asyncio.run(run(g))
        pem = g.public_key(EC_KEY)
        status = g.status()
    assert errors == [] and len(signed) == 1024 and len({d for d, _ in signed}) == 1024
    pub = load_pem_public_key(pem)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    for data, sig in signed:
        pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    counters = status["counters"]
    assert counters["coalesced"] > 0 and counters["recoveries"] >= 1
    assert counters["ops_ok"] >= 1024


def test_a_blocking_caller_runs_on_a_free_workers_host_itself(net_config: Config, group: Testbed) -> None:
    """The direct path: no thread hand-off, the same books -- and a hang there still costs
    only that caller its deadline, and the host is replaced."""
    with guard(net_config.replace(workers=2, call_s=1.0)) as g:
        sig = g.sign(EC_KEY, b"direct")
        pub = load_pem_public_key(g.public_key(EC_KEY))
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(sig, b"direct", ec.ECDSA(hashes.SHA256()))
        before = g.status()
        assert before["counters"]["direct"] >= 2 and before["in_flight"] == 0  # sign and public_key ran here
        worker = before["workers"][0]
        g.inject_fault(worker["id"], "hang", seconds=30)
        signs = [g.submit_sign(EC_KEY, b"queued %d" % i) for i in range(4)]  # meanwhile, others go on
        assert all(f.result(20) for f in signs)
        assert g.sign(EC_KEY, b"after the hang")  # whichever worker: the hung host is replaced
        wait_until(lambda: _find(g.status(), worker["id"])["pid"] != worker["pid"], 20, "a new host")
        assert g.status()["generation"] == 0
