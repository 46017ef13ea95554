"""The host process and the protocol, against SoftHSM2 directly and through the testbed."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from conftest import gone, spawn_host, wait_until
from p11guard import (
    AuthError,
    ChannelPoisoned,
    Config,
    GroupLossError,
    HostCrashed,
    HostError,
    HostTimeout,
    ModuleLoadError,
    RequestError,
    Secret,
    StaleGeneration,
    UserError,
)
from p11guard.host import HostProcess
from p11guard.host._ckr import ckr_kind, ckr_name
from p11guard.protocol import decode, encode
from p11guard.testbed import Testbed


def _verify(pem: bytes, signature: bytes, data: bytes, mechanism: str) -> None:
    pub = load_pem_public_key(pem)
    if mechanism == "ecdsa-sha256":
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif mechanism == "ecdsa-sha384":
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(signature, data, ec.ECDSA(hashes.SHA384()))
    elif mechanism == "rsa-pkcs1-sha256":
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    elif mechanism == "rsa-pss-sha256":
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(signature, data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    elif mechanism == "ed25519":
        assert isinstance(pub, ed25519.Ed25519PublicKey)
        pub.verify(signature, data)
    else:
        raise AssertionError(mechanism)


@pytest.mark.parametrize(
    ("key", "mechanism"),
    [
        ("test-ec", "ecdsa-sha256"),
        ("test-ec384", "ecdsa-sha384"),
        ("test-ec", "ecdsa-sha384"),
        ("test-rsa", "rsa-pkcs1-sha256"),
        ("test-rsa", "rsa-pss-sha256"),
        ("test-ed", "ed25519"),
    ],
)
def test_sign_verifies_with_cryptography(open_host: HostProcess, key: str, mechanism: str) -> None:
    data = b"record " + mechanism.encode()
    sig = open_host.call("sign", {"key": key, "data": data, "mechanism": mechanism})
    _verify(open_host.call("public_key", {"key": key}), sig, data, mechanism)
    assert open_host.call("verify", {"key": key, "data": data, "signature": sig, "mechanism": mechanism})
    assert not open_host.call("verify", {"key": key, "data": data + b"x", "signature": sig, "mechanism": mechanism})


def test_hmac_aes_digest_random(open_host: HostProcess) -> None:
    mac = open_host.call("sign", {"key": "test-hmac", "data": b"m", "mechanism": "hmac-sha256"})
    assert len(mac) == 32
    assert open_host.call("verify", {"key": "test-hmac", "data": b"m", "signature": mac, "mechanism": "hmac-sha256"})
    ct = open_host.call("encrypt", {"key": "test-aes", "data": b"secret", "aad": b"hdr"})
    assert len(ct) == 12 + 6 + 16 and b"secret" not in ct
    assert open_host.call("decrypt", {"key": "test-aes", "data": ct, "aad": b"hdr"}) == b"secret"
    with pytest.raises(UserError):  # a wrong AAD fails the tag check
        open_host.call("decrypt", {"key": "test-aes", "data": ct, "aad": b"other"})
    import hashlib

    assert open_host.call("digest", {"data": b"abc"}) == hashlib.sha256(b"abc").digest()
    r1, r2 = open_host.call("random", {"n": 32}), open_host.call("random", {"n": 32})
    assert len(r1) == 32 and r1 != r2


def test_generate_list_destroy(open_host: HostProcess) -> None:
    label = f"tmp-{os.getpid()}-{time.monotonic_ns()}"
    out = open_host.call("generate_key_pair", {"label": label, "type": "ec-p256"})
    assert out["label"] == label and out["type"] == "ec-p256"
    listed = {k["label"]: k for k in open_host.call("list_keys")}
    assert listed[label]["type"] == "ec-p256"
    with pytest.raises(UserError, match="already exists"):
        open_host.call("generate_key_pair", {"label": label, "type": "ec-p256"})
    assert open_host.call("destroy", {"label": label}) == 2
    assert label not in {k["label"] for k in open_host.call("list_keys")}


def test_batch_of_1000_in_order_with_per_item_error(open_host: HostProcess) -> None:
    items = [("sign", {"key": "test-ec", "data": b"%d" % i}) for i in range(1000)]
    items[500] = ("sign", {"key": "no-such-key", "data": b"x"})
    results = open_host.call_batch(items)
    assert len(results) == 1000
    assert isinstance(results[500], UserError) and results[500].name == "key_not_found"
    pem = open_host.call("public_key", {"key": "test-ec"})
    for i in (0, 1, 499, 501, 999):
        _verify(pem, results[i], b"%d" % i, "ecdsa-sha256")


# -- the crash table ---------------------------------------------------------------------------


@pytest.mark.parametrize(("how", "signame"), [("segv", "SIGSEGV"), ("sigkill", "SIGKILL"), ("exit", None)])
def test_crash_is_reported_with_signal_or_code(open_host: HostProcess, how: str, signame: str | None) -> None:
    with pytest.raises(HostCrashed) as info:
        open_host.call("fault", {"action": "crash", "how": how})
    assert info.value.signal_name == signame
    assert info.value.exitcode == (13 if how == "exit" else -getattr(signal, str(signame)))
    assert info.value.pid == open_host.pid and str(open_host.pid) in str(info.value)
    with pytest.raises(HostError, match="not usable"):  # never reused
        open_host.call("random", {"n": 1})


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ({"op": "nope", "args": {}}, "unknown op 'nope'"),
        ({"op": "sign", "args": {"key": 5, "data": b"x"}}, "'key' must be str"),
        ({"op": "sign", "args": {"key": "test-ec"}}, "missing argument 'data'"),
        ({"op": "sign", "args": {"key": "test-ec", "data": b"x", "mechanism": "rot13"}}, "unknown mechanism"),
        ({"op": "random", "args": {"n": 10**9}}, "between 1 and"),
        ({"op": "sign", "args": "not a map"}, "'args' must be a map"),
    ],
)
def test_bad_requests_get_clear_errors_and_host_survives(open_host: HostProcess, request_: dict, match: str) -> None:
    reply = open_host.send_raw(encode({"id": 7, "gen": 0, **request_}))
    assert reply["err"]["kind"] == "bad_request"
    assert match in reply["err"]["message"]
    assert len(open_host.call("random", {"n": 4})) == 4


def test_missing_key_and_wrong_mechanism(open_host: HostProcess) -> None:
    with pytest.raises(UserError, match=r"no private key labelled 'ghost'.*test-ec") as info:
        open_host.call("sign", {"key": "ghost", "data": b"x"})
    assert info.value.name == "key_not_found"
    with pytest.raises(UserError, match="does not fit a rsa-2048 key"):
        open_host.call("sign", {"key": "test-rsa", "data": b"x", "mechanism": "ecdsa-sha256"})


def test_unencodable_arguments_are_refused_before_sending(open_host: HostProcess) -> None:
    with pytest.raises(RequestError, match="cannot encode"):
        open_host.call("sign", {"key": "test-ec", "data": object()})
    assert open_host.alive


def test_garbage_frame_poisons_the_channel(open_host: HostProcess) -> None:
    with pytest.raises(HostCrashed) as info:
        open_host.send_raw(b"\xc1\xc1 not msgpack")
    assert info.value.exitcode == 3  # the host closed the channel and exited: never resyncs
    assert not open_host.alive


def test_non_map_frame_poisons(open_host: HostProcess) -> None:
    with pytest.raises(HostCrashed):
        open_host.send_raw(msgpack.packb([1, 2, 3]))


def test_oversized_frame_is_refused_both_ways(direct_config: Config, bed: Testbed) -> None:
    host = HostProcess.spawn(direct_config.module_path, env=direct_config.module_env, max_frame=4096)
    try:
        host.open(bed.token_label, bed.pin, 10)
        with pytest.raises(RequestError, match="exceeds the limit"):  # parent side: never sent
            host.call("sign", {"key": "test-ec", "data": b"x" * 8192})
        with pytest.raises(UserError, match="exceeds the limit"):  # host side: reply too large
            host.call("random", {"n": 8000})
        assert len(host.call("random", {"n": 16})) == 16
        with pytest.raises(HostCrashed):  # a raw oversized frame poisons the host's side
            host.send_raw(b"\x80" * 10000)
    finally:
        host.kill()


def test_truncated_frame_then_death_is_a_crash(open_host: HostProcess) -> None:
    # Write a length prefix promising more bytes than follow, then the host is killed.
    conn = open_host._conn
    assert conn is not None
    os.write(conn.fileno(), (1000).to_bytes(4, "big") + b"\x81")
    os.kill(open_host.pid or 0, signal.SIGKILL)
    with pytest.raises(HostCrashed, match="SIGKILL"):
        open_host.call("random", {"n": 1}, 5)


def test_frames_module() -> None:
    assert decode(encode({"a": b"\x00", "b": [1, "x"]})) == {"a": b"\x00", "b": [1, "x"]}
    from p11guard.protocol import FrameError

    with pytest.raises(FrameError):
        decode(msgpack.packb({1: 2}))  # strict_map_key
    with pytest.raises(FrameError):
        encode({"x": b"0" * 100}, max_frame=50)


def test_ckr_taxonomy_uses_pykcs11_names() -> None:
    assert (ckr_kind(0x30), ckr_name(0x30)) == ("group_loss", "CKR_DEVICE_ERROR")
    assert ckr_kind(0xB3) == "session" and ckr_kind(0x82) == "session"
    assert ckr_kind(0xA0) == "auth" and ckr_name(0xA0) == "CKR_PIN_INCORRECT"
    assert ckr_kind(0x190) == "group_loss" and ckr_kind(0xE1) == "group_loss"
    assert ckr_kind(0xC0) == "user"  # CKR_SIGNATURE_INVALID
    assert ckr_kind(0x05) == "internal"


# -- auth, generations, secrets ----------------------------------------------------------------


def test_wrong_pin_is_one_login_and_auth_error(direct_config: Config, bed: Testbed) -> None:
    host = spawn_host(direct_config)
    try:
        with pytest.raises(AuthError) as info:
            host.open(bed.token_label, Secret("000000-wrong"), 10)
        assert info.value.name == "CKR_PIN_INCORRECT" and info.value.kind == "auth"
        assert host.call("ping")["login_attempts"] == 1
        assert "000000-wrong" not in str(info.value) and "000000-wrong" not in repr(info.value)
    finally:
        host.kill()


def test_token_label_not_found_lists_labels(direct_config: Config, bed: Testbed) -> None:
    host = spawn_host(direct_config)
    try:
        with pytest.raises(GroupLossError, match=rf"no token labelled 'nope'.*{bed.token_label}"):
            host.open("nope", bed.pin, 10)
    finally:
        host.kill()


def test_unloadable_module(tmp_path) -> None:
    fake = tmp_path / "not-a-module.so"
    fake.write_bytes(b"garbage")
    with pytest.raises(ModuleLoadError, match="cannot load PKCS#11 module"):
        HostProcess.spawn(str(fake))


def test_stale_generation_is_refused(direct_config: Config, bed: Testbed) -> None:
    host = spawn_host(direct_config, generation=3)
    try:
        host.open(bed.token_label, bed.pin, 10)
        reply = host.send_raw(encode({"id": 1, "gen": 2, "op": "sign", "args": {"key": "test-ec", "data": b"x"}}))
        assert reply["err"]["kind"] == "stale_generation"
        assert "generation 2 refused by a host of generation 3" in reply["err"]["message"]
        from p11guard.base import remote_error

        assert isinstance(remote_error(reply["err"], op="sign", pid=host.pid, generation=3), StaleGeneration)
    finally:
        host.kill()


def test_pin_never_in_repr_argv_env_or_logs(
    direct_config: Config, bed: Testbed, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    pin = bed.pin.reveal()
    monkeypatch.setenv("P11GUARD_TEST_PIN", pin)  # a PIN in the parent's environment...
    caplog.set_level(logging.DEBUG)
    host = spawn_host(direct_config)
    try:
        host.open(bed.token_label, bed.pin, 10)
        import psutil

        proc = psutil.Process(host.pid)
        assert not any(pin in part for part in proc.cmdline())
        assert all(pin not in v for v in proc.environ().values())  # ...never reaches a host
        assert pin not in repr(host) and pin not in repr(bed.pin) and pin not in str(bed.pin)
        assert pin not in repr(direct_config)
    finally:
        host.kill()
    assert pin not in caplog.text


def test_spurious_start_errors_do_not_stop_many_hosts(direct_config: Config, bed: Testbed) -> None:
    # Many processes opening the token at once (the condition that makes SoftHSM2 answer
    # CKR_GENERAL_ERROR now and then): every host must come up.
    hosts = [HostProcess(direct_config.module_path, env=direct_config.module_env) for _ in range(6)]
    try:
        for h in hosts:
            h._start(30)
        for h in hosts:
            h.open(bed.token_label, bed.pin, 30)
        assert all(len(h.call("random", {"n": 8})) == 8 for h in hosts)
    finally:
        for h in hosts:
            h.kill()


# -- through the testbed -----------------------------------------------------------------------


def test_group_loss_through_testbed(net_host: HostProcess, group: Testbed) -> None:
    assert net_host.call("sign", {"key": "test-ec", "data": b"x"})
    group.fault("lose")
    with pytest.raises(GroupLossError) as info:
        net_host.call("sign", {"key": "test-ec", "data": b"x"})
    assert info.value.ckr == 0x30 and info.value.kind == "group_loss"


def test_hang_passes_deadline_and_kill_is_fast(net_host: HostProcess, net_config: Config, group: Testbed) -> None:
    group.fault("hang")
    with pytest.raises(HostTimeout) as info:
        net_host.call("sign", {"key": "test-ec", "data": b"x"}, deadline_s=0.5)
    assert info.value.deadline_s == 0.5
    pid = net_host.pid
    assert pid is not None
    net_host.kill()  # kill() reaps: the hung host is gone when it returns (its speed: scripts/bench)
    assert not net_host.alive and gone(pid)
    group.fault("restore")
    fresh = spawn_host(net_config)
    try:
        fresh.open(group.token_label, group.pin, 10)
        assert fresh.call("sign", {"key": "test-ec", "data": b"x"})
    finally:
        fresh.kill()


def test_hang_injected_in_host_holds_gil_and_times_out(open_host: HostProcess) -> None:
    open_host.call("fault", {"action": "hang", "seconds": 30})
    with pytest.raises(HostTimeout):
        open_host.call("random", {"n": 1}, deadline_s=0.3)
    open_host.kill()
    assert not open_host.alive


def test_fault_injection_is_refused_when_disabled(direct_config: Config, bed: Testbed) -> None:
    host = spawn_host(direct_config, fault_injection=False)
    try:
        with pytest.raises(RequestError, match="fault injection is disabled"):
            host.call("fault", {"action": "crash", "how": "exit"})
        assert host.alive
    finally:
        host.kill()


_PARENT = textwrap.dedent("""
    import sys, os
    from p11guard.host import HostProcess
    host = HostProcess.spawn(sys.argv[1], env={"SOFTHSM2_CONF": sys.argv[2]}, fault_injection=True)
    if sys.argv[3] == "hung":
        host.call("fault", {"action": "hang", "seconds": 60})
    print(host.pid, flush=True)
    if sys.argv[3] == "hung":
        host.call("random", {"n": 1}, 120)
    else:
        sys.stdin.read()
""")


@pytest.mark.parametrize("mode", ["idle", "hung"])
def test_host_dies_with_its_parent(direct_config: Config, bed: Testbed, mode: str) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, direct_config.module_path, str(bed.softhsm_conf), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        host_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait(5)
        wait_until(lambda: gone(host_pid), timeout=1.0, what="the orphaned host to exit")
    finally:
        parent.kill()
        parent.wait(5)


def test_channel_poisoned_error_reads_well() -> None:
    err = ChannelPoisoned("channel poisoned: bad", pid=12, generation=3, op="sign")
    assert str(err) == "channel poisoned: bad [pid=12, generation=3, op=sign]"
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert again.pid == 12 and str(again) == str(err)


def test_host_ignores_sigint(open_host: HostProcess) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the parent decides, not the host.
    os.kill(open_host.pid or 0, signal.SIGINT)
    assert len(open_host.call("random", {"n": 4})) == 4 and open_host.alive


def test_fast_sign_path_is_used_directly_and_not_through_rpc(open_host: HostProcess, net_host: HostProcess) -> None:
    # SoftHSM2 in-process: signing goes through the module's own function list (ctypes);
    # p11-kit-client hands out a fresh instance per C_GetFunctionList: PyKCS11's path is kept.
    # Both must give signatures that verify.
    for host in (open_host, net_host):
        sig = host.call("sign", {"key": "test-ec", "data": b"fast?"})
        _verify(host.call("public_key", {"key": "test-ec"}), sig, b"fast?", "ecdsa-sha256")


def test_module_output_goes_to_the_logger_rate_limited(
    open_host: HostProcess, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    from p11guard.host._output import BURST_LINES

    caplog.set_level(logging.WARNING, logger="p11guard.host")
    open_host.call("fault", {"action": "say", "lines": 400, "text": "ESYS error"})
    pid = open_host.pid
    open_host.kill()  # EOF on its pipe: the count of what was left out is logged
    wait_until(lambda: any("left out" in r.getMessage() for r in caplog.records), 5, "the summary line")
    said = [r.getMessage() for r in caplog.records if r.name == "p11guard.host"]
    assert said[:BURST_LINES] == [f"host host (pid {pid}): ESYS error {i}" for i in range(BURST_LINES)]
    assert said[-1] == f"host host (pid {pid}): {400 - BURST_LINES} more lines of module output left out"
    assert "ESYS" not in capfd.readouterr().err  # never straight to the terminal
