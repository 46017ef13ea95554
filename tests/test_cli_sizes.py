"""Records too large for one frame fail alone; batches are built by size as well as count."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cli_helpers import entries, run, sign_args, verify_ec, write_pubkey

from conftest import EC_KEY
from p11guard import Config, Guard
from p11guard.base import RequestError
from p11guard.testbed import Testbed

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
LIMIT = "16,711,680 bytes"  # 16 MiB (one frame) less 64 KiB for the request around the record


def test_a_huge_line_fails_alone_and_again_alone(
    bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out, report = tmp_path / "records.txt", tmp_path / "sigs.jsonl", tmp_path / "r.json"
    with source.open("wb") as fh:
        for i in range(1, 101):
            fh.write(b"x" * (20 * MIB) + b"\n" if i == 50 else b"record number %d\n" % i)
    code, text, _ = run(capsys, sign_args(bed, source, out, "--report", str(report)))
    assert code == 1, text
    data = json.loads(report.read_text())
    assert (data["records"], data["signed"], data["failed"]) == (100, 99, 1)
    assert data["failures"][0]["id"] == "50"
    reason = data["failures"][0]["reason"]
    assert "record of 20,971,520 bytes" in reason and LIMIT in reason and "split it" in reason
    assert f"failed 50: record of 20,971,520 bytes is larger than the {LIMIT}" in text
    assert sorted(int(e["id"]) for e in entries(out)) == [i for i in range(1, 101) if i != 50]

    code, text, _ = run(capsys, sign_args(bed, source, out, "--report", str(report)))
    data = json.loads(report.read_text())
    assert code == 1 and (data["signed"], data["skipped"], data["failed"]) == (0, 99, 1)

    pub = write_pubkey(bed, tmp_path / "pub.pem")
    code, text, _ = run(capsys, ["verify", "--in", str(source), "--sigs", str(out), "--pubkey", str(pub)])
    assert code == 1 and "valid 99, missing 1" in text and "missing: 50" in text


def test_large_records_are_batched_by_size(bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "big"
    root.mkdir()
    sizes = {"a-6m": 6 * MIB, "b-12m": 12 * MIB, "c-6m": 6 * MIB, "d-7m": 7 * MIB}
    for name, size in sizes.items():
        (root / name).write_bytes(name.encode()[:1] * size)
    for i in range(10):
        (root / f"small-{i}").write_bytes(b"small %d" % i)
    out = tmp_path / "sigs.jsonl"
    code, text, _ = run(capsys, sign_args(bed, root, out))
    assert code == 0 and "records 14, signed 14" in text, text  # 31 MiB: in one batch of 64 it was too large
    pem = write_pubkey(bed, tmp_path / "pub.pem").read_bytes()
    for entry in entries(out):
        verify_ec(pem, (root / entry["id"]).read_bytes(), base64.b64decode(entry["signature"]))


def test_sign_many_fails_an_oversized_item_alone(direct_config: Config) -> None:
    items = [b"first", b"x" * (17 * MIB), b"second", b"y" * (9 * MIB), b"third"]
    with Guard(direct_config) as g:
        pem = g.public_key(EC_KEY)
        results = g.sign_many(EC_KEY, items, return_exceptions=True)
        assert len(results) == 5
        error = results[1]
        assert isinstance(error, RequestError) and error.name == "too_large"
        assert "item 1: 17,825,792 bytes" in str(error) and LIMIT in str(error)
        for i in (0, 2, 3, 4):
            verify_ec(pem, items[i], results[i])
        with pytest.raises(RequestError, match="17,825,792 bytes"):
            g.sign_many(EC_KEY, items)
        frames = g.submit_sign_many(EC_KEY, items)
        assert [count for count, _ in frames] == [1, 1, 1, 1, 1]  # 5 items, each frame by size or alone
        for _, future in frames:
            future.result(timeout=60)
