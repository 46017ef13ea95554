"""Integrity: the right token and the right key after every recovery; one label, one key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from conftest import EC_KEY, guard, spawn_host, wait_until
from p11guard import (
    Config,
    Guard,
    HostStartError,
    KeyChanged,
    LabelAmbiguous,
    LabelTaken,
    TokenMismatch,
    UserError,
)
from p11guard.host import HostProcess
from p11guard.testbed import Testbed, find_tools
from p11guard.testbed._network import start_server
from p11guard.testbed._procs import stop_tree
from p11guard.testbed._softhsm import init_softhsm_token


def _verifies(pem: bytes, sig: bytes, data: bytes) -> bool:
    pub = load_pem_public_key(pem)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    try:
        pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except Exception:
        return False
    return True


def test_a_different_token_under_the_same_label_is_kept_out(group: Testbed, tmp_path: Path) -> None:
    """The server comes back with ANOTHER SoftHSM2 store: same label, same PIN, a key of the
    same label. Today it is served silently; now it is kept out, naming both serials."""
    tools = find_tools()
    other = tmp_path / "impostor"
    other.mkdir()
    init_softhsm_token(other, tools, group.token_label, user_pin=group.pin.reveal())
    host = HostProcess.spawn(tools["softhsm"], env={"SOFTHSM2_CONF": str(other / "softhsm2.conf")})
    try:
        host.open(group.token_label, group.pin, 30)
        host.call("generate_key_pair", {"label": EC_KEY, "type": "ec-p256"}, 30)
        impostor_pem = host.call("public_key", {"key": EC_KEY})
    finally:
        host.close()
    member = dict(group._state()["members"][0])
    with guard(group.client_config()) as g:
        ours = g.public_key(EC_KEY)
        first = g.status()["members"][0]["token"]
        group.fault("kill-server")
        start_server(other, tools, group.token_label, member, lambda: None, 30)
        try:
            wait_until(lambda: g.state == "FAILED", 20, "the impostor kept out")
            status = g.status()
            with pytest.raises(Exception, match="different token answers") as info:
                g.sign(EC_KEY, b"must not be signed by the impostor")
        finally:
            stop_tree(member.get("server_pid"), member.get("server_created"))
    reason = status["members"][0]["reason"]
    assert status["members"][0]["state"] == "out"
    assert repr(first["serial"]) in reason and "found serial" in reason
    assert "GuardFailed" in type(info.value).__name__
    assert ours != impostor_pem


def test_pinned_serials_keep_out_any_other_token(group: Testbed) -> None:
    with pytest.raises(TokenMismatch, match="not one of group.serials"):
        Guard(group.client_config(serials=("0000000000000000",)))


def _rotate_outside(bed: Testbed, label: str) -> bytes:
    """Destroy and regenerate ``label`` through a host of our own, not through the guard."""
    config = Config.from_file(bed.direct_config_path)
    host = spawn_host(config)
    try:
        host.open(bed.token_label, bed.pin, 30)
        host.call("destroy", {"label": label}, 30)
        host.call("generate_key_pair", {"label": label, "type": "ec-p256"}, 30)
        pem: bytes = host.call("public_key", {"key": label}, 30)
        return pem
    finally:
        host.close()


def test_a_key_changed_elsewhere_is_refused_until_refreshed(group: Testbed) -> None:
    label = "identity-rotated"
    group.ensure_keys({label: "ec-p256"})
    with guard(group.client_config(workers=1)) as g:
        old = g.public_key(label)
        assert _verifies(old, g.sign(label, b"before"), b"before")
        new = _rotate_outside(group, label)
        pid = g.host_pids()["worker-0"]
        os.kill(pid, signal.SIGKILL)  # a new host, a new session: keys are checked again
        wait_until(lambda: g.host_pids().get("worker-0") not in (None, pid), 20, "the worker's new host")
        with pytest.raises(KeyChanged) as info:
            g.sign(label, b"after")
        assert info.value.label == label and info.value.expected != info.value.found
        assert info.value.expected in str(info.value) and "refresh_keys" in str(info.value)
        g.refresh_keys([label])
        sig = g.sign(label, b"after")
        assert _verifies(new, sig, b"after") and g.public_key(label) == new
        assert g.status()["keys"][label] == info.value.found


def test_a_key_rotated_through_the_guard_is_repinned(group: Testbed) -> None:
    label = "identity-through-guard"
    with guard(group.client_config(workers=2)) as g:
        if label in {k["label"] for k in g.list_keys()}:
            g.destroy(label)
        g.generate_key_pair(label, "ec-p256")
        first = g.public_key(label)
        g.sign(label, b"x")
        assert g.destroy(label) == 2
        g.generate_key_pair(label, "ec-p256")
        second = g.public_key(label)
        sigs = g.sign_many(label, [b"%d" % i for i in range(20)])  # on both workers
        assert first != second and all(_verifies(second, s, b"%d" % i) for i, s in enumerate(sigs))


_TWINS = r"""
import json, sys, PyKCS11
d = json.loads(sys.stdin.read())
lib = PyKCS11.PyKCS11Lib(); lib.load(d["module"])
slot = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.rstrip() == d["token"]][0]
s = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION); s.login(d["pin"])
for i in (1, 2):
    common = [(PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_LABEL, d["label"]), (PyKCS11.CKA_ID, bytes([i]))]
    s.generateKeyPair(
        common + [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
                  (PyKCS11.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107")), (PyKCS11.CKA_VERIFY, True)],
        common + [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
                  (PyKCS11.CKA_SIGN, True), (PyKCS11.CKA_PRIVATE, True)],
        PyKCS11.Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN))
"""


def test_a_label_that_names_two_keys_is_refused_for_every_op(group: Testbed) -> None:
    label = "identity-twins"
    config = Config.from_file(group.direct_config_path)
    done = subprocess.run(
        [sys.executable, "-c", _TWINS],
        input=json.dumps(
            {"module": config.module_path, "token": group.token_label, "pin": group.pin.reveal(), "label": label}
        ),
        env={**config.module_env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    try:
        with guard(group.client_config(workers=1)) as g:
            for call in (lambda: g.sign(label, b"x"), lambda: g.public_key(label)):
                with pytest.raises(LabelAmbiguous, match=r"names 2 .*CKA_ID 01, 02"):
                    call()
            assert g.state == "SERVING" and g.status()["counters"]["recoveries"] == 0
    finally:
        host = spawn_host(config)
        host.open(group.token_label, group.pin, 30)
        host.call("destroy", {"label": label}, 30)
        host.close()


def test_two_processes_generating_one_label_leave_one_key_pair(group: Testbed) -> None:
    """Two host processes (two guards, say) make the same label at the same instant, 12
    times: one wins, the other is told (label exists, or LabelTaken when it made its key
    at the same moment); never two keys under one label."""
    config = Config.from_file(group.direct_config_path)
    hosts = [spawn_host(config) for _ in range(2)]
    outcomes: list[list[Any]] = []
    try:
        for h in hosts:
            h.open(group.token_label, group.pin, 30)
        for n in range(12):
            label = f"identity-race-{n}"
            results: list[Any] = [None, None]
            start = threading.Barrier(2)

            def make(
                i: int, label: str = label, results: list[Any] = results, start: threading.Barrier = start
            ) -> None:
                start.wait()
                try:
                    results[i] = hosts[i].call("generate_key_pair", {"label": label, "type": "ec-p256"}, 60)
                except UserError as exc:
                    results[i] = exc

            threads = [threading.Thread(target=make, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            outcomes.append(results)
            keys = [k for k in hosts[0].call("list_keys", {}, 30) if k["label"] == label]
            winners = [r for r in results if isinstance(r, dict)]
            losers = [r for r in results if not isinstance(r, dict)]
            assert all(isinstance(r, LabelTaken) or "already exists" in str(r) for r in losers), losers
            if not keys:  # both made theirs at the same instant and both stepped back
                assert winners == [], results
                continue
            assert len(keys) == 1 and sorted(keys[0]["classes"]) == ["private key", "public key"], keys
            assert len(winners) == 1 and winners[0]["id"] == keys[0]["id"], results
            sig = hosts[0].call("sign", {"key": label, "data": b"race"}, 30)
            assert _verifies(hosts[1].call("public_key", {"key": label}, 30), sig, b"race")
            hosts[0].call("destroy", {"label": label}, 30)
        # never two keys under one label, and each race had its loser
        assert all(sum(not isinstance(r, dict) for r in results) >= 1 for results in outcomes), outcomes
    finally:
        for h in hosts:
            h.kill()


def test_an_error_while_starting_ends_the_start_at_once(group: Testbed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the guard waited 2*start_s + probe_s (65 s) and the process never exited."""
    import p11guard.host._process as process

    monkeypatch.setattr(process, "host_command", lambda fd: ["/bin/true\0bad"])
    with pytest.raises(HostStartError, match="cannot start host process: ValueError"):
        Guard(group.client_config(start_s=30.0))
