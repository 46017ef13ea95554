"""The main job: `p11guard sign` / `verify` from the command line, through kills and losses."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EC_KEY, wait_until
from p11guard.cli import main
from p11guard.testbed import Testbed


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture
def pub(bed: Testbed, tmp_path: Path) -> Path:
    path = tmp_path / "pub.pem"
    assert main(["pubkey", "--config", str(bed.direct_config_path), "--key", EC_KEY, "--out", str(path)]) == 0
    return path


def _records_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "records.txt"
    path.write_text("".join(f"record number {i}\n" for i in range(1, n + 1)))
    return path


def _sign_args(config: Path | str, source: Path, out: Path, *extra: str) -> list[str]:
    return ["sign", "--config", str(config), "--key", EC_KEY, "--in", str(source), "--out", str(out), "--quiet", *extra]


def _sign_cmd(config: Path, source: Path, out: Path, *extra: str) -> list[str]:
    """`p11guard sign` as its own process (to be killed)."""
    return [sys.executable, "-m", "p11guard", *_sign_args(config, source, out, *extra)]


def _sign_direct(bed: Testbed, source: Path, out: Path, *extra: str) -> int:
    """`p11guard sign` in-process, on SoftHSM2 directly."""
    return main(_sign_args(bed.direct_config_path, source, out, *extra))


def _verify(source: Path, out: Path, pub: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["verify", "--in", str(source), "--sigs", str(out), "--pubkey", str(pub)])
    text = capsys.readouterr().out
    assert code == 0, text
    return text


def test_sign_lines_then_resume_skips(
    bed: Testbed, pub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out, report = _records_file(tmp_path, 300), tmp_path / "sigs.jsonl", tmp_path / "r.json"
    assert _sign_direct(bed, source, out, "--report", str(report)) == 0
    assert "records 300, signed 300" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert (data["records"], data["signed"], data["skipped"], data["failed"]) == (300, 300, 0, 0)
    assert {"recoveries", "outage_s", "elapsed_s", "ops_per_s"} <= data.keys()
    first = json.loads(out.read_text().splitlines()[0])
    assert first["id"] == "1" and first["mechanism"] == "ecdsa-sha256" and first["key"] == EC_KEY
    assert "records 300, valid 300, missing 0, duplicate 0" in _verify(source, out, pub, capsys)
    assert _sign_direct(bed, source, out) == 0
    assert "signed 0, skipped 300" in capsys.readouterr().out
    assert _lines(out) == 300


def test_signature_accepted_by_openssl(bed: Testbed, pub: Path, tmp_path: Path) -> None:
    source, out = _records_file(tmp_path, 3), tmp_path / "sigs.jsonl"
    assert _sign_direct(bed, source, out) == 0
    entry = json.loads(out.read_text().splitlines()[1])
    (tmp_path / "sig").write_bytes(base64.b64decode(entry["signature"]))
    (tmp_path / "rec").write_bytes(b"record number 2")
    openssl = subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha256",
            "-verify",
            str(pub),
            "-signature",
            str(tmp_path / "sig"),
            str(tmp_path / "rec"),
        ],
        capture_output=True,
        text=True,
    )
    if openssl.returncode == 127 or "not found" in openssl.stderr:
        pytest.skip("openssl not installed")
    assert "Verified OK" in openssl.stdout


def test_sign_directory_with_unreadable_file(
    bed: Testbed, pub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "release"
    (root / "sub" / "deeper").mkdir(parents=True)
    for rel in ("a.txt", "sub/b.bin", "sub/deeper/c", "z"):
        (root / rel).write_bytes(rel.encode() * 10)
    bad = root / "sub" / "locked"
    bad.write_bytes(b"secret")
    bad.chmod(0)
    out = tmp_path / "sigs.jsonl"
    try:
        code = _sign_direct(bed, root, out)
        text = capsys.readouterr().out
        if os.geteuid() == 0:  # root reads everything: the record is simply signed
            assert code == 0
        else:
            assert code == 1 and "failed sub/locked: cannot read" in text
        ids = {json.loads(line)["id"] for line in out.read_text().splitlines()}
        assert {"a.txt", "sub/b.bin", "sub/deeper/c", "z"} <= ids
    finally:
        bad.chmod(0o600)
    if os.geteuid() == 0:
        _verify(root, out, pub, capsys)


@pytest.mark.parametrize("fraction", [0.0, 0.4, 0.8])
def test_kill_9_then_rerun_is_exactly_once(
    bed: Testbed, pub: Path, tmp_path: Path, fraction: float, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 20_000  # ~1 s of signing in-process: 4,000 could all be signed before the kill at 80 %
    source, out = _records_file(tmp_path, n), tmp_path / "sigs.jsonl"
    proc = subprocess.Popen(_sign_cmd(bed.direct_config_path, source, out))
    try:
        # kill at three moments: before the first line is out, and at ~40 % and ~80 %
        if fraction:
            wait_until(lambda: _lines(out) >= n * fraction or proc.poll() is not None, 60, "progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait(10)
    assert _lines(out) < n  # it was killed mid-run
    with out.open("ab") as fh:  # and as if the kill had cut the last write in half
        fh.write(b'{"id":"9999","sha256":"ab')
    assert subprocess.run(_sign_cmd(bed.direct_config_path, source, out), timeout=120).returncode == 0
    lines = out.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == n and len(set(ids)) == n
    _verify(source, out, pub, capsys)


def test_group_loss_mid_run(group: Testbed, pub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 3000
    source, out, report = _records_file(tmp_path, n), tmp_path / "sigs.jsonl", tmp_path / "r.json"
    proc = subprocess.Popen(_sign_cmd(group.config_path, source, out, "--report", str(report)))
    try:
        wait_until(lambda: _lines(out) >= n // 4, 60, "a quarter signed")
        refused = group.fault("lose")["fault"]["refused"]
        # the run noticed: its recovery probes are being refused by the lost group
        wait_until(lambda: group.status()["fault"]["refused"] > refused, 30, "recovery probes")
        group.fault("restore")
        assert proc.wait(120) == 0
    finally:
        proc.kill()
        proc.wait(10)
    data = json.loads(report.read_text())
    assert data["signed"] == n and data["failed"] == 0
    assert data["recoveries"] >= 1 and data["outage_s"] > 0
    _verify(source, out, pub, capsys)


def test_verify_catches_tampered_missing_duplicate(
    bed: Testbed, pub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = _records_file(tmp_path, 20), tmp_path / "sigs.jsonl"
    assert _sign_direct(bed, source, out) == 0
    lines = out.read_text().splitlines()
    del lines[4]  # record 5: missing
    lines.append(lines[0])  # record 1: duplicate
    entry = json.loads(lines[9])  # record 11: signature of another record
    entry["signature"] = json.loads(lines[10])["signature"]
    lines[9] = json.dumps(entry)
    out.write_text("\n".join(lines) + "\n")
    text = source.read_text().replace("record number 7\n", "record number 7 (altered)\n")
    source.write_text(text)  # record 7: tampered after signing
    capsys.readouterr()
    code = main(["verify", "--in", str(source), "--sigs", str(out), "--pubkey", str(pub)])
    report = capsys.readouterr().out
    assert code == 1
    assert "missing: 5" in report and "duplicate: 1" in report
    assert "tampered: 7" in report and "invalid: 11" in report


# -- bad input: a clear one-line error, exit 2, nothing written ------------------------------------


def _bad(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


def _config_variant(bed: Testbed, tmp_path: Path, old: str, new: str) -> str:
    text = bed.direct_config_path.read_text()
    assert old in text
    path = tmp_path / "variant.toml"
    path.write_text(text.replace(old, new))
    return str(path)


def test_bad_input(
    bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, out = _records_file(tmp_path, 5), tmp_path / "out.jsonl"

    def sign(config: str, *extra: str) -> list[str]:
        return ["sign", "--config", config, "--key", EC_KEY, "--in", str(source), "--out", str(out), *extra]

    _bad(capsys, sign(str(tmp_path / "none.toml")), "cannot read config file")
    unreadable = tmp_path / "locked.toml"
    unreadable.write_text("[module")
    _bad(capsys, sign(str(unreadable)), "not valid TOML")
    _bad(
        capsys,
        sign(_config_variant(bed, tmp_path, "/usr/lib/softhsm/libsofthsm2.so", "/no/such.so")),
        "module.path",
        "no such file",
    )
    fake = tmp_path / "fake.so"
    fake.write_bytes(b"not a module")
    _bad(
        capsys,
        sign(_config_variant(bed, tmp_path, "/usr/lib/softhsm/libsofthsm2.so", str(fake))),
        "cannot load PKCS#11 module",
    )
    _bad(
        capsys,
        sign(_config_variant(bed, tmp_path, f'token_label = "{bed.token_label}"', 'token_label = "nope"')),
        "no token labelled 'nope'",
        bed.token_label,
    )
    _bad(
        capsys,
        sign(_config_variant(bed, tmp_path, str(bed.pin_path), str(tmp_path / "no-pin"))),
        "group.pin_file",
        "cannot read PIN file",
    )
    monkeypatch.delenv("P11G_UNSET_PIN", raising=False)
    _bad(
        capsys,
        sign(_config_variant(bed, tmp_path, f'pin_file = "{bed.pin_path}"', 'pin_env = "P11G_UNSET_PIN"')),
        "group.pin_env",
        "P11G_UNSET_PIN is not set",
    )
    config = str(bed.direct_config_path)
    _bad(
        capsys,
        ["sign", "--config", config, "--key", "ghost", "--in", str(source), "--out", str(out)],
        "--key 'ghost'",
        EC_KEY,
    )
    _bad(capsys, sign(config, "--mechanism", "rsa-pkcs1-sha256"), "does not fit key", "ecdsa-sha256")
    _bad(capsys, sign(config, "--mechanism", "rot13"), "unknown")
    _bad(
        capsys,
        ["sign", "--config", config, "--key", EC_KEY, "--in", str(tmp_path / "nothing"), "--out", str(out)],
        "no such file or directory",
    )
    assert not out.exists()  # nothing written by any of the above
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("hello world\n")
    _bad(
        capsys,
        ["sign", "--config", config, "--key", EC_KEY, "--in", str(source), "--out", str(foreign)],
        "not a p11guard signature file",
        "another --out",
    )
    assert foreign.read_text() == "hello world\n"
    _bad(
        capsys,
        ["keygen", "--config", config, "--label", EC_KEY, "--type", "ec-p256"],
        "already exists",
        "--exist-ok",
    )
    _bad(capsys, ["keygen", "--config", config, "--label", "x", "--type", "dsa-1024"], "--type 'dsa-1024'")
    _bad(
        capsys,
        ["verify", "--in", str(source), "--sigs", str(foreign), "--pubkey", str(source)],
        "not a PEM public key",
    )


def test_keys_and_keygen_exist_ok(bed: Testbed, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(bed.direct_config_path)
    assert main(["keygen", "--config", config, "--label", EC_KEY, "--type", "ec-p256", "--exist-ok"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["keys", "--config", config]) == 0
    listing = capsys.readouterr().out
    assert EC_KEY in listing and "ec-p256" in listing and "rsa-2048" in listing


def test_demo_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "p11guard.cli._demo", "--json", "--records", "1500", "--outage", "1"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["records"] == summary["signed"] == summary["verified"] == 1500
    assert summary["lost"] == 0 and summary["duplicates"] == 0 and summary["recoveries"] == 1
    assert {"outage_s", "time_to_recover_s"} <= summary.keys()
