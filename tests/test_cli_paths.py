"""Paths are checked before the first record is signed: bad ones exit 2 with one line."""

from __future__ import annotations

import base64
import json
import os
import socket
from pathlib import Path

import pytest
from cli_helpers import records_file, run, sign_args, usage_error, verify_ec, write_pubkey

from conftest import EC_KEY
from p11guard.testbed import Testbed

pytestmark = pytest.mark.timeout(60)  # a FIFO opened the blocking way would hang for ever


def test_out_and_report_checked_before_anything_is_signed(
    bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = records_file(tmp_path, 5)
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, where a folder is expected\n")
    good_out = tmp_path / "out.jsonl"

    usage_error(capsys, sign_args(bed, source, tmp_path / "missing" / "out.jsonl"), "--out", "does not exist")
    usage_error(capsys, sign_args(bed, source, blocker / "out.jsonl"), "--out", "is not a folder")
    usage_error(capsys, sign_args(bed, source, tmp_path), "--out", "is a directory, not a regular file")
    usage_error(capsys, sign_args(bed, source, source), "--out", "same file as --in")
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    usage_error(capsys, sign_args(bed, source, fifo), "--out", "is a FIFO, not a regular file")
    for report in (blocker / "r.json", tmp_path / "nowhere" / "r.json", tmp_path, good_out):
        usage_error(capsys, sign_args(bed, source, good_out, "--report", str(report)), "--report")

    folder = tmp_path / "folder"
    folder.mkdir()
    usage_error(capsys, sign_args(bed, folder, folder / "out.jsonl"), "is inside --in", "put it elsewhere")
    usage_error(capsys, sign_args(bed, folder, good_out, "--report", str(folder / "r.json")), "is inside --in")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "out.fifo", "records.txt"]
    assert list(folder.iterdir()) == []  # nothing written
    assert source.read_text().count("\n") == 5
    assert blocker.read_text().startswith("a regular file")


def test_pubkey_out_unwritable(bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = str(bed.direct_config_path)
    for out, word in ((blocker / "pub.pem", "is not a folder"), (tmp_path / "no" / "pub.pem", "does not exist")):
        usage_error(capsys, ["pubkey", "--config", config, "--key", EC_KEY, "--out", str(out)], "--out", word)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_inputs_that_are_not_regular_files(bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)  # no writer: reading it the blocking way never returns
    out = tmp_path / "out.jsonl"
    usage_error(capsys, sign_args(bed, fifo, out), f"--in {fifo} is a FIFO, not a regular file")
    usage_error(capsys, sign_args(bed, Path("/dev/zero"), out), "--in /dev/zero is a character device")
    assert not out.exists()

    source = records_file(tmp_path, 3)
    pub = write_pubkey(bed, tmp_path / "pub.pem")
    assert run(capsys, sign_args(bed, source, out))[0] == 0

    def verify(src: Path, sigs: Path, pem: Path) -> list[str]:
        return ["verify", "--in", str(src), "--sigs", str(sigs), "--pubkey", str(pem)]

    usage_error(capsys, verify(fifo, out, pub), "--in", "is a FIFO")
    usage_error(capsys, verify(source, fifo, pub), "--sigs", "is a FIFO")
    usage_error(capsys, verify(source, Path("/dev/zero"), pub), "--sigs /dev/zero is a character device")
    usage_error(capsys, verify(source, out, Path("/dev/zero")), "--pubkey /dev/zero is a character device")
    usage_error(capsys, verify(source, out, tmp_path), "--pubkey", "is a directory")
    assert run(capsys, verify(source, out, pub))[0] == 0


def test_special_files_in_a_directory_fail_as_records(
    bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "release"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "b.bin").write_bytes(b"beta" * 100)
    os.mkfifo(root / "sub" / "pipe")
    (root / "zero").symlink_to("/dev/zero")  # a link is no record: never followed
    monkeypatch.chdir(root)  # a short relative path: AF_UNIX names are short
    out, report = tmp_path / "sigs.jsonl", tmp_path / "r.json"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock")
        code, text, _ = run(capsys, sign_args(bed, root, out, "--report", str(report)))
    assert code == 1, text
    data = json.loads(report.read_text())
    assert (data["records"], data["signed"], data["failed"]) == (4, 2, 2)
    reasons = {f["id"]: f["reason"] for f in data["failures"]}
    assert "is a socket, not a regular file: not read" in reasons["sock"]
    assert "is a FIFO, not a regular file: not read" in reasons["sub/pipe"]
    assert "failed sub/pipe:" in text and "failed sock:" in text
    pem = write_pubkey(bed, tmp_path / "pub.pem").read_bytes()
    signed = {e["id"]: e for e in (json.loads(line) for line in out.read_text().splitlines())}
    assert sorted(signed) == ["a.txt", "sub/b.bin"]
    for rid, entry in signed.items():
        verify_ec(pem, (root / rid).read_bytes(), base64.b64decode(entry["signature"]))
