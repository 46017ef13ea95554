"""Resume is strict: the output is checked line by line, changed records are never skipped
silently, and an output signed by another key is refused."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from cli_helpers import entries, fingerprint, records_file, run, sign_args, usage_error, verify_ec, write_pubkey

from conftest import EC_KEY
from p11guard import Config, Guard
from p11guard.testbed import Testbed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def signed5(bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """Five records, signed."""
    source, out = records_file(tmp_path, 5), tmp_path / "sigs.jsonl"
    assert run(capsys, sign_args(bed, source, out))[0] == 0
    return source, out


def _with_line(out: Path, n: int, line: str | bytes) -> None:
    lines = out.read_bytes().splitlines(keepends=True)
    lines[n - 1] = (line.encode() if isinstance(line, str) else line) + b"\n"
    out.write_bytes(b"".join(lines))


@pytest.mark.parametrize(
    ("bad_id", "words"),
    [
        ("\u00b2", ["line 3", "id '\u00b2' is not a line number"]),  # str.isdigit() says yes
        ("3000000000", ["line 3", "id 3000000000 is not a line of --in", "it has 5 lines"]),
        ("99999999999999", ["line 3", "id 99999999999999 is not a line of --in"]),
        ("1" * 400, ["line 3", "is not a line number"]),
        ("6", ["line 3", "id 6 is not a line of --in"]),
        ("0", ["line 3", "id '0' is not a line number"]),
        ("03", ["line 3", "id '03' is not a line number"]),
        ("-1", ["line 3", "is not a line number"]),
    ],
)
def test_ids_are_strict_and_bounded(
    bed: Testbed, signed5: tuple[Path, Path], capsys: pytest.CaptureFixture[str], bad_id: str, words: list[str]
) -> None:
    source, out = signed5
    entry = entries(out)[2]
    entry["id"] = bad_id
    _with_line(out, 3, json.dumps(entry))
    before = out.read_bytes()
    started = time.monotonic()
    usage_error(capsys, sign_args(bed, source, out), f"--out {out}", *words)
    assert time.monotonic() - started < 5  # refused at load: no HSM, no huge allocation
    assert out.read_bytes() == before


def test_malformed_lines_in_the_middle_are_named(
    bed: Testbed, signed5: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = signed5
    good = out.read_bytes()
    first = entries(out)[0]
    other_key = {**entries(out)[2], "key_sha256": "0" * 64}
    cases: list[tuple[str, list[str]]] = [
        ("garbage", ["line 3: is not JSON"]),
        ('{"id":"3"}', ['line 3: has no string "sha256"']),
        (json.dumps({**entries(out)[2], "sha256": "xyz"}), ['line 3: "sha256" is not 64 lowercase hex']),
        (json.dumps({**entries(out)[2], "signature": "%%%"}), ['line 3: "signature" is not base64']),
        (json.dumps(first), ["line 3: signs record '1' again (first on line 1) without \"replaces\""]),
        (json.dumps({**first, "replaces": 2}), ["line 3: replaces line 2", "record '1' is on line 1"]),
        (json.dumps({**entries(out)[2], "replaces": 1}), ["line 3: replaces line 1, which holds no signature"]),
        (json.dumps(other_key), ["line 3: signed by key", "0" * 64, "but line 1 by"]),
        ("", ["line 3: is not JSON"]),
    ]
    for line, words in cases:
        _with_line(out, 3, line)
        damaged = out.read_bytes()
        usage_error(capsys, sign_args(bed, source, out), f"--out {out}, ", *words, "choose another --out")
        assert out.read_bytes() == damaged
        out.write_bytes(good)
    out.write_bytes(b"hello\n" + good)
    usage_error(capsys, sign_args(bed, source, out), "is not a p11guard signature file", "line 1 is not JSON")


@pytest.mark.parametrize("keep", [3, 40, -2])
def test_a_last_line_cut_short_is_redone(
    bed: Testbed, signed5: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], keep: int
) -> None:
    source, out = signed5
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:4]) + lines[4][:keep])  # the kill cut record 5's line
    code, text, _ = run(capsys, sign_args(bed, source, out))
    assert code == 0 and "signed 1, skipped 4" in text, text
    assert [e["id"] for e in entries(out)] == ["1", "2", "3", "4", "5"]
    pub = write_pubkey(bed, tmp_path / "pub.pem")
    assert run(capsys, ["verify", "--in", str(source), "--sigs", str(out), "--pubkey", str(pub)])[0] == 0


def test_changed_records_are_reported_then_resigned(
    bed: Testbed, signed5: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = signed5
    pub = write_pubkey(bed, tmp_path / "pub.pem")
    verify = ["verify", "--in", str(source), "--sigs", str(out), "--pubkey", str(pub)]
    source.write_text(source.read_text().replace("record number 2\n", "record number 2 (changed)\n"))
    source.write_text(source.read_text().replace("record number 4\n", "record number four\n"))
    before = out.read_bytes()

    report = tmp_path / "r.json"
    code, text, err = run(capsys, sign_args(bed, source, out, "--report", str(report)))
    assert code == 1, text
    assert "skipped 3" in text and "changed 2 (not re-signed)" in text
    assert "changed 2: differs from what line 2 of --out signed" in text
    assert len(err.strip().splitlines()) == 1
    assert "2 record(s) changed since they were signed" in err and ": 2, 4;" in err and "--resign-changed" in err
    data = json.loads(report.read_text())
    assert (data["signed"], data["skipped"], data["changed"], data["failed"]) == (0, 3, 2, 0)
    assert data["changes"] == [{"id": "2", "line": 2}, {"id": "4", "line": 4}]
    assert out.read_bytes() == before  # not re-signed, not skipped as if fine
    code, text, _ = run(capsys, verify)
    assert code == 1 and "tampered: 2, 4" in text

    code, text, _ = run(capsys, sign_args(bed, source, out, "--resign-changed"))
    assert code == 0 and "signed 2 (2 re-signed after a change), skipped 3" in text, text
    new = entries(out)
    assert len(new) == 7 and [(e["id"], e.get("replaces")) for e in new[5:]] == [("2", 2), ("4", 4)]
    pem = pub.read_bytes()
    verify_ec(pem, b"record number 2 (changed)", base64.b64decode(new[5]["signature"]))
    code, text, _ = run(capsys, verify)
    assert code == 0 and "records 5, valid 5, missing 0, duplicate 0" in text, text

    # a second change to the same record: the new line replaces the line in force (6), not 2
    source.write_text(source.read_text().replace("record number 2 (changed)\n", "record number 2 (again)\n"))
    assert run(capsys, sign_args(bed, source, out, "--resign-changed"))[0] == 0
    assert entries(out)[7]["replaces"] == 6
    code, text, _ = run(capsys, sign_args(bed, source, out))
    assert code == 0 and "signed 0, skipped 5" in text
    assert run(capsys, verify)[0] == 0


def test_the_key_fingerprint_is_recorded_and_checked(
    bed: Testbed, direct_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    label = "test-rotated"
    source, out = records_file(tmp_path, 3), tmp_path / "sigs.jsonl"
    with Guard(direct_config) as g:
        g.destroy(label)
        g.generate_key_pair(label, "ec-p256")
        old_fp = fingerprint(g.public_key(label))
    try:
        assert run(capsys, sign_args(bed, source, out, key=label))[0] == 0
        assert {e["key_sha256"] for e in entries(out)} == {old_fp}
        with source.open("a") as fh:
            fh.write("record number 4\n")
        with Guard(direct_config) as g:  # another key under the same label
            g.destroy(label)
            g.generate_key_pair(label, "ec-p256")
            new_fp = fingerprint(g.public_key(label))
        assert new_fp != old_fp
        before = out.read_bytes()
        usage_error(
            capsys, sign_args(bed, source, out, key=label), old_fp, new_fp, "another --out", "the key that signed it"
        )
        assert out.read_bytes() == before
    finally:
        with Guard(direct_config) as g:
            g.destroy(label)

    # an output written before fingerprints were recorded cannot be told to be the same key
    source, out = records_file(tmp_path, 2, "two.txt"), tmp_path / "old.jsonl"
    assert run(capsys, sign_args(bed, source, out))[0] == 0
    pem = write_pubkey(bed, tmp_path / "pub.pem").read_bytes()
    assert entries(out)[0]["key_sha256"] == fingerprint(pem)
    out.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "key_sha256"}) + "\n" for e in entries(out)))
    usage_error(capsys, sign_args(bed, source, out), "fingerprint none recorded", fingerprint(pem))


def test_verify_flags_a_fingerprint_that_is_not_the_pubkey(
    bed: Testbed, signed5: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = signed5
    pub = write_pubkey(bed, tmp_path / "pub.pem")
    _with_line(out, 2, json.dumps({**entries(out)[1], "key_sha256": "f" * 64}))
    code, text, _ = run(capsys, ["verify", "--in", str(source), "--sigs", str(out), "--pubkey", str(pub)])
    assert code == 1 and "wrong_key: 2" in text and "valid 4" in text
    assert EC_KEY in entries(out)[0]["key"]
