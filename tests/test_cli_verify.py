"""`p11guard verify` at scale keeps its contract: every kind of problem is reported by id,
whatever the order of the signature file (within the window, beyond it, sorted on disk)
and however many processes check it (--jobs 1 and 2 give the same report)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import records_file, run, sign_args, usage_error, write_pubkey

from p11guard.cli._verify import run_verify
from p11guard.cli._verifypool import CHUNK_TASKS
from p11guard.cli._verifyreport import KINDS
from p11guard.testbed import Testbed

pytestmark = pytest.mark.timeout(180)

N = 2 * CHUNK_TASKS + 300  # three chunks: --jobs 2 really runs a pool


class Layout:
    """A signature file as a list of lines, where a line may re-sign another (by index):
    written in any order, its ``replaces`` follows the lines to their new numbers."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines: list[bytes | dict[str, Any]] = [json.loads(line) for line in lines]
        self.replaces: dict[int, int] = {}  # index -> index of the line it replaces
        self.bad: list[int] = []  # indexes of lines that are no signature entry

    def find(self, rid: str) -> int:
        return next(i for i, e in enumerate(self.lines) if isinstance(e, dict) and e["id"] == rid)

    def add(self, line: bytes | dict[str, Any], replaces: int | None = None) -> int:
        self.lines.append(line)
        if replaces is not None:
            self.replaces[len(self.lines) - 1] = replaces
        return len(self.lines) - 1

    def write(self, path: Path, order: list[int] | None = None) -> dict[int, int]:
        """Write the lines in ``order``; the line number each index got."""
        order = order or list(range(len(self.lines)))
        number = {index: n for n, index in enumerate(order, 1)}
        out = []
        for index in order:
            line = self.lines[index]
            if isinstance(line, dict):
                entry = dict(line)
                if index in self.replaces:
                    entry["replaces"] = number[self.replaces[index]]
                out.append(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
            else:
                out.append(line)
        path.write_bytes(b"".join(out))
        return number

    def shuffled(self, seed: int) -> list[int]:
        """A random order in which each line still comes after the line it replaces."""
        order = list(range(len(self.lines)))
        random.Random(seed).shuffle(order)
        for chain in self._chains():
            slots = sorted(order.index(i) for i in chain)
            for slot, index in zip(slots, chain, strict=True):
                order[slot] = index
        return order

    def _chains(self) -> list[list[int]]:
        chains = []
        for start in set(self.replaces.values()) - set(self.replaces):
            chain, nxt = [start], {v: k for k, v in self.replaces.items()}
            while chain[-1] in nxt:
                chain.append(nxt[chain[-1]])
            chains.append(chain)
        return chains


@pytest.fixture(scope="module")
def signed(bed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, Path]:
    """N records signed by `p11guard sign` (the HSM): the input, the signature file, the key."""
    from p11guard.cli import main

    tmp = tmp_path_factory.mktemp("signed")
    source, out = records_file(tmp, N), tmp / "sigs.jsonl"
    assert main(sign_args(bed, source, out)) == 0
    return source, out.read_bytes(), write_pubkey(bed, tmp / "pub.pem")


@pytest.fixture
def damaged(signed: tuple[Path, bytes, Path], tmp_path: Path) -> tuple[Path, Layout, Path]:
    """A copy of the input and a signature file with one of every kind of problem."""
    source, sigs, pub = signed
    text = source.read_text().replace("record number 7\n", "record number 7 (altered)\n")  # tampered: 7
    (tmp_path / "records.txt").write_text(text)
    layout = Layout(sigs.splitlines(keepends=True))
    del layout.lines[4]  # missing: 5
    layout.add(layout.lines[0])  # duplicate: 1 (a second line without "replaces")
    i11, i12 = layout.find("11"), layout.find("12")
    layout.lines[i11] = {**layout.lines[i11], "signature": layout.lines[i12]["signature"]}  # type: ignore[dict-item]
    i20 = layout.find("20")
    layout.lines[i20] = {**layout.lines[i20], "key_sha256": "f" * 64}  # type: ignore[dict-item]  # wrong_key: 20
    for rid in ("99999", "03", "abc"):  # unknown ids
        layout.add({**layout.lines[2], "id": rid})  # type: ignore[dict-item]
    i40 = layout.find("40")
    layout.lines[i40] = b'{"id":"40","sha256":"zz"}\n'  # malformed: record 40 has no signature left
    layout.bad = [i40, layout.add(b"garbage\n"), layout.add(b'{"id":"' + b"x" * 70_000 + b'"}\n')]  # too long
    i30 = layout.find("30")
    again = layout.add(layout.lines[i30], replaces=i30)  # re-signed twice: one signature in force
    layout.add(layout.lines[i30], replaces=again)
    i50 = layout.find("50")
    layout.add(layout.lines[i50], replaces=layout.find("1"))  # replaces another record's line: duplicate 50
    i60 = layout.find(str(N))
    layout.add({**layout.lines[i60], "sha256": "0" * 64}, replaces=i60)  # the re-sign in force is tampered
    return tmp_path / "records.txt", layout, pub


EXPECTED = {
    "missing": ["5", "40"],
    "duplicate": ["1", "50"],
    "invalid": ["11"],
    "tampered": ["7", str(N)],
    "wrong_key": ["20"],
    "unknown": ["03", "99999", "abc"],
}


def _report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _verify(capsys: pytest.CaptureFixture[str], source: Path, sigs: Path, pub: Path, *extra: str) -> tuple[int, str]:
    code, out, err = run(capsys, ["verify", "--in", str(source), "--sigs", str(sigs), "--pubkey", str(pub), *extra])
    assert err == ""
    return code, out


def test_every_kind_is_reported_the_same_with_one_or_two_processes(
    damaged: tuple[Path, Layout, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, layout, pub = damaged
    sigs = tmp_path / "sigs.jsonl"
    number = layout.write(sigs)
    outputs, reports = [], []
    for jobs in ("1", "2"):
        report = tmp_path / f"r{jobs}.json"
        code, out = _verify(capsys, source, sigs, pub, "--jobs", jobs, "--report", str(report))
        assert code == 1, out
        outputs.append(out)
        reports.append(_report(report))
    assert outputs[0] == outputs[1] and reports[0] == reports[1]
    data = reports[0]
    assert {k: data[k] for k in EXPECTED} == EXPECTED
    assert data["malformed_lines"] == sorted(number[i] for i in layout.bad)
    assert data["counts"] == {k: len(data[k]) for k in KINDS}
    assert (data["records"], data["valid"], data["ok"]) == (N, N - 8, False)
    out = outputs[0]
    assert f"records {N}, valid {N - 8}, missing 2, duplicate 2, invalid 1, tampered 2" in out
    assert "wrong key 1, unknown ids 3, malformed lines 3" in out
    assert "  missing: 5, 40\n" in out and "  duplicate: 1, 50\n" in out and f"  tampered: 7, {N}\n" in out
    assert "  unknown: 03, 99999, abc\n" in out and out.rstrip().endswith("FAILED")


@pytest.mark.parametrize(("window", "sort_bytes"), [(4096, 32 << 20), (3, 4000), (1, 1)])
def test_out_of_order_within_and_beyond_the_window(
    damaged: tuple[Path, Layout, Path], tmp_path: Path, window: int, sort_bytes: int
) -> None:
    """Shuffled: the whole file fits the default window; a window of 3 sends most lines to
    the external sort, in runs of ~10 lines; 1 byte makes a run of every line (many
    merge rounds)."""
    source, layout, pub = damaged
    sigs = tmp_path / "sigs.jsonl"
    layout.write(sigs)
    in_order = run_verify(source, sigs, pub, report_path=tmp_path / "in-order.json")
    number = layout.write(sigs, layout.shuffled(seed=window))
    shuffled = run_verify(
        source, sigs, pub, jobs=2, report_path=tmp_path / "shuffled.json", window=window, sort_bytes=sort_bytes
    )
    assert shuffled.summary().splitlines()[0] == in_order.summary().splitlines()[0]
    a, b = _report(tmp_path / "in-order.json"), _report(tmp_path / "shuffled.json")
    assert {k: b[k] for k in EXPECTED} == EXPECTED
    assert {k: v for k, v in a.items() if k != "malformed_lines"} == {
        k: v for k, v in b.items() if k != "malformed_lines"
    }
    assert b["malformed_lines"] == sorted(number[i] for i in layout.bad)


def test_a_clean_file_in_any_order_is_ok(
    signed: tuple[Path, bytes, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, sigs, pub = signed
    lines = sigs.splitlines(keepends=True)
    random.Random(3).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_bytes(b"".join(lines))
    for jobs in ("1", "2"):
        code, out = _verify(capsys, source, shuffled, pub, "--jobs", jobs)
        assert code == 0 and f"records {N}, valid {N}, missing 0, duplicate 0" in out, out
    report = run_verify(source, shuffled, pub, jobs=2, window=2, sort_bytes=10_000)
    assert report.ok and report.valid == N


def test_bad_jobs_and_report(
    signed: tuple[Path, bytes, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, sigs, pub = signed
    sig_path = tmp_path / "sigs.jsonl"
    sig_path.write_bytes(sigs)
    argv = ["verify", "--in", str(source), "--sigs", str(sig_path), "--pubkey", str(pub)]
    for bad in ("0", "-1", "x", "257"):
        usage_error(capsys, [*argv, "--jobs", bad], f"--jobs {bad!r}", "from 1 to 256")
    usage_error(capsys, [*argv, "--report", str(tmp_path / "no" / "r.json")], "--report", "does not exist")
    usage_error(capsys, [*argv, "--report", str(sig_path)], "--report", "same file as --sigs")
    assert sig_path.read_bytes() == sigs


def test_no_temporary_folder(
    bed: Testbed,
    signed: tuple[Path, bytes, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, sigs, pub = signed
    sig_path = tmp_path / "sigs.jsonl"
    sig_path.write_bytes(sigs)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # as TMPDIR naming no folder
    argv = ["verify", "--in", str(source), "--sigs", str(sig_path), "--pubkey", str(pub)]
    usage_error(capsys, argv, "cannot make a temporary folder in", "gone", "set TMPDIR")
    usage_error(capsys, sign_args(bed, source, sig_path), "cannot make a temporary folder in", "set TMPDIR")
    assert sig_path.read_bytes() == sigs


def _reference(source: Path, sigs: Path, pub: Path) -> dict[str, Any]:
    """What verify reported before it streamed: everything in memory, the plain algorithm."""
    from collections import defaultdict

    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from p11guard.cli._keyinfo import pem_fingerprint
    from p11guard.cli._records import iter_records, parse_entry
    from p11guard.cli._verifywork import verify_signature

    key, fingerprint = load_pem_public_key(pub.read_bytes()), pem_fingerprint(pub.read_bytes())
    found: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    out: dict[str, Any] = {kind: [] for kind in KINDS}
    for n, line in enumerate(sigs.read_bytes().splitlines(keepends=True), 1):
        entry = parse_entry(line)[0] if len(line) <= 64 * 1024 else None
        if entry is None:
            out["malformed_lines"].append(n)
        else:
            found[entry["id"]].append((n, entry))
    records = valid = 0
    for record in iter_records(source):
        records += 1
        kept: list[tuple[int, dict[str, Any]]] = []
        for n, entry in found.pop(record.id, []):
            kept = [(m, e) for m, e in kept if m != entry.get("replaces")] + [(n, entry)]
        if not kept:
            out["missing"].append(record.id)
            continue
        if len(kept) > 1:
            out["duplicate"].append(record.id)
        if record.data is None:
            out["invalid"].append(record.id)
            continue
        good = 0
        for _, entry in kept:
            if entry["sha256"] != hashlib.sha256(record.data).hexdigest():
                out["tampered"].append(record.id)
            elif entry.get("key_sha256", fingerprint) != fingerprint:
                out["wrong_key"].append(record.id)
            elif verify_signature(key, entry["mechanism"], base64.b64decode(entry["signature"]), record.data):
                good += 1
            else:
                out["invalid"].append(record.id)
        valid += good == 1 and len(kept) == 1
    out["unknown"] = sorted(found)
    return {"records": records, "valid": valid, **out}


def _damage(rng: random.Random, source: Path, lines: list[bytes]) -> list[bytes]:
    """Random damage of every kind, in random places and orders."""
    lines = list(lines)
    for _ in range(rng.randrange(5, 40)):
        op = rng.randrange(9)
        i = rng.randrange(len(lines))
        entry = parse_or_none(lines[i])
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(rng.randrange(len(lines) + 1), lines[i])
        elif op == 2 and entry is not None:
            other = parse_or_none(lines[rng.randrange(len(lines))])
            if other is not None:
                lines[i] = _dump({**entry, "signature": other["signature"]})
        elif op == 3 and entry is not None:
            lines.append(_dump({**entry, "replaces": rng.randrange(1, len(lines) + 2)}))
        elif op == 4 and entry is not None:
            lines[i] = _dump({**entry, "id": rng.choice(["0", "07", "x", str(N + rng.randrange(1, 9))])})
        elif op == 5:
            lines.insert(i, rng.choice([b"garbage\n", b"{}\n", b'{"id":"3"}\n', b"[1]\n"]))
        elif op == 6 and entry is not None:
            lines[i] = _dump({**entry, "key_sha256": "e" * 64})
        elif op == 7:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 8:
            data = source.read_bytes().splitlines(keepends=True)
            k = rng.randrange(len(data))
            data[k] = b"changed " + data[k]
            source.write_bytes(b"".join(data))
    return lines


def parse_or_none(line: bytes) -> dict[str, Any] | None:
    from p11guard.cli._records import parse_entry

    return parse_entry(line)[0]


def _dump(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


@pytest.mark.parametrize("seed", range(4))
def test_random_damage_reports_what_the_in_memory_verify_did(
    signed: tuple[Path, bytes, Path], tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    source, sigs, pub = signed
    copy, out = tmp_path / "records.txt", tmp_path / "sigs.jsonl"
    copy.write_bytes(source.read_bytes())
    out.write_bytes(b"".join(_damage(rng, copy, sigs.splitlines(keepends=True))))
    expected = _reference(copy, out, pub)
    window, sort_bytes = rng.choice([(4096, 1 << 25), (2, 3000), (1, 1)])
    report = run_verify(
        copy, out, pub, jobs=rng.choice([1, 2]), report_path=tmp_path / "r.json", window=window, sort_bytes=sort_bytes
    )
    data = _report(tmp_path / "r.json")
    assert {k: data[k] for k in expected} == expected
    assert report.ok == (expected["valid"] == N and not any(expected[k] for k in KINDS))


def test_a_directory_the_same_with_one_or_two_processes(
    bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from p11guard.cli import main

    root = tmp_path / "tree"
    for i in range(N):
        folder = root / f"part-{i % 7}" / ("deep" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}.txt").write_text(f"file {i}\n")
    out, pub = tmp_path / "sigs.jsonl", write_pubkey(bed, tmp_path / "pub.pem")
    assert main(sign_args(bed, root, out)) == 0
    (root / "part-1" / "f1.txt").write_text("tampered\n")
    (root / "part-2" / "f2.txt").unlink()  # unknown
    (root / "part-3" / "new.txt").write_text("never signed\n")  # missing
    lines = out.read_bytes().splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    out.write_bytes(b"".join([*lines, lines[5]]))  # and a duplicate
    expected = _reference(root, out, pub)
    assert expected["tampered"] == ["part-1/f1.txt"] and expected["unknown"] == ["part-2/f2.txt"]
    for jobs in ("1", "2"):
        report = tmp_path / f"r{jobs}.json"
        code, text = _verify(capsys, root, out, pub, "--jobs", jobs, "--report", str(report))
        assert code == 1, text
        data = _report(report)
        assert {k: data[k] for k in expected} == expected
