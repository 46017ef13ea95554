"""The testbed: a real simulated network HSM group (p11-kit RPC over SoftHSM2)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from conftest import EC_KEY, gone, spawn_host, wait_until
from p11guard import Config, GroupLossError, HostTimeout
from p11guard.cli import main
from p11guard.host import HostProcess
from p11guard.testbed import Testbed


def test_fresh_client_signs_and_cryptography_verifies(net_host: HostProcess) -> None:
    sig = net_host.call("sign", {"key": EC_KEY, "data": b"through the proxy"})
    pub = load_pem_public_key(net_host.call("public_key", {"key": EC_KEY}))
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"through the proxy", ec.ECDSA(hashes.SHA256()))


def test_after_lose_restore_old_client_needs_reinit(net_host: HostProcess, net_config: Config, group: Testbed) -> None:
    group.fault("lose")
    group.fault("restore")
    # The library instance that was connected keeps failing with CKR_DEVICE_ERROR...
    for _ in range(3):
        with pytest.raises(GroupLossError) as info:
            net_host.call("sign", {"key": EC_KEY, "data": b"x"})
        assert info.value.ckr == 0x30
    # ...while a fresh process (a fresh C_Initialize) works.
    fresh = spawn_host(net_config)
    try:
        fresh.open(group.token_label, group.pin, 10)
        assert fresh.call("sign", {"key": EC_KEY, "data": b"x"})
    finally:
        fresh.kill()


def test_hang_blocks_the_call(net_host: HostProcess, group: Testbed) -> None:
    group.fault("hang")
    with pytest.raises(HostTimeout):
        net_host.call("random", {"n": 8}, deadline_s=1.0)
    assert net_host.alive  # still blocked inside the module call after the deadline
    assert group.status()["fault"]["mode"] == "hung"


def _round_trip_s(host: HostProcess, n: int = 15) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        host.call("random", {"n": 8})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_latency_slows_a_round_trip(net_host: HostProcess, group: Testbed) -> None:
    base = _round_trip_s(net_host)
    group.fault("latency", 2)
    slow = _round_trip_s(net_host)
    group.fault("latency", 0)
    # 2 ms each way on at least one round trip: >= 4 ms added; assert half of it.
    assert slow > base + 0.002, (base, slow)


def test_kill_and_start_server(net_config: Config, group: Testbed) -> None:
    old = group.status()["server"]["pid"]
    group.fault("kill-server")
    assert group.status()["server"]["running"] is False
    wait_until(lambda: gone(old), 5, "server gone")
    with pytest.raises(GroupLossError):  # C_Initialize or the login fails: server gone
        host = spawn_host(net_config)
        try:
            host.open(group.token_label, group.pin, 10)
        finally:
            host.kill()
    group.fault("start-server")
    assert group.status()["server"]["running"] is True
    fresh = spawn_host(net_config)
    try:
        fresh.open(group.token_label, group.pin, 10)
        assert fresh.call("random", {"n": 4})
    finally:
        fresh.kill()


def test_down_leaves_nothing_and_up_reuses_token(tmp_path: Path, bed: Testbed) -> None:
    other = Testbed(tmp_path / "second")  # runs beside the session's testbed
    try:
        assert other.up() is True
        assert other.up() is False  # already running: nothing started
        assert bed.is_up and other.proxy_socket != bed.proxy_socket
        config = Config.from_file(other.config_path)
        host = spawn_host(config)
        host.open(other.token_label, other.pin, 10)
        host.call("generate_key_pair", {"label": "kept", "type": "ec-p256"})
        pem = host.call("public_key", {"key": "kept"})
        host.close()
        pids = other.pids()
        assert len(pids) >= 2
        other.down()
        for pid in pids:
            wait_until(lambda pid=pid: gone(pid), 5, f"testbed process {pid} gone")
        assert not other.is_up and other.status() == {"up": False, "dir": str(other.dir)}
        other.up()
        host = spawn_host(Config.from_file(other.config_path))
        host.open(other.token_label, other.pin, 10)
        assert host.call("public_key", {"key": "kept"}) == pem
        host.close()
    finally:
        other.down()


def test_pin_files_are_private(bed: Testbed) -> None:
    assert (bed.pin_path.stat().st_mode & 0o777) == 0o600
    assert ((bed.dir / "so.pin").stat().st_mode & 0o777) == 0o600


# -- the CLI's bad input: one line, exit 2 -------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err


def test_cli_fault_and_down_without_testbed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(
        capsys,
        main(["testbed", "fault", "--dir", str(tmp_path), "lose"]),
        "no testbed is running",
        "testbed up --dir",
    )
    _one_line_error(capsys, main(["testbed", "down", "--dir", str(tmp_path)]), "no testbed", "testbed up --dir")


def test_cli_unknown_fault(bed: Testbed, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(
        capsys,
        main(["testbed", "fault", "--dir", str(bed.dir), "explode"]),
        "unknown fault 'explode'",
        "lose",
    )
    _one_line_error(
        capsys, main(["testbed", "fault", "--dir", str(bed.dir), "latency", "soon"]), "number of milliseconds"
    )


def test_cli_up_with_packages_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P11GUARD_P11KIT", str(tmp_path / "no-p11-kit"))
    _one_line_error(
        capsys,
        main(["testbed", "up", "--dir", str(tmp_path / "tb")]),
        "missing Debian packages: p11-kit",
        "apt-get install",
    )


def test_cli_status_and_fault(group: Testbed, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["testbed", "fault", "--dir", str(group.dir), "latency", "1.5"]) == 0
    assert '"latency_ms": 1.5' in capsys.readouterr().out
    assert main(["testbed", "status", "--dir", str(group.dir)]) == 0
    out = capsys.readouterr().out
    assert '"running": true' in out and '"mode": "normal"' in out


def test_cli_members_bad_input(bed: Testbed, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(
        capsys,
        main(["testbed", "fault", "--dir", str(bed.dir), "--member", "hsm-z", "lose"]),
        "no member 'hsm-z'",
        "hsm",
    )
    assert main(["testbed", "up", "--dir", str(bed.dir), "--members", "0"]) == 2
    assert "members must be between 1 and 8, not 0" in capsys.readouterr().err
    # the session's testbed has one member: asking for three names the way out
    _one_line_error(
        capsys,
        main(["testbed", "up", "--dir", str(bed.dir), "--members", "3"]),
        "already runs",
        "testbed down --dir",
    )
    assert main(["testbed", "fault", "--dir", str(bed.dir), "--member", "hsm", "latency", "0"]) == 0
