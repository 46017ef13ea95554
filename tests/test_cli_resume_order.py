"""Resume with flat memory: the signature file is joined with the records in record order
(directories walked sorted), in whatever order its lines are; a resume that finds every
record signed does not start a guard; the first wrong line is named in file order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from cli_helpers import entries, records_file, run, sign_args, usage_error, write_pubkey

from p11guard.cli._keyorder import WINDOW, path_key
from p11guard.cli._verify import run_verify
from p11guard.testbed import Testbed

pytestmark = pytest.mark.timeout(180)

FILES = ["a.txt", "a-b/y", "a/x", "a/b/c", "a0", "b", "Z", "ü.txt", "with space/f", "sub/deeper/c", "~"]


def _tree(root: Path) -> Path:
    for rel in FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"content of {rel}\n")
    return root


def _broken_config(bed: Testbed, tmp_path: Path) -> str:
    """The testbed's config with a token label no token has: a guard cannot start."""
    text = bed.direct_config_path.read_text()
    path = tmp_path / "no-token.toml"
    path.write_text(text.replace(f'token_label = "{bed.token_label}"', 'token_label = "nope"'))
    return str(path)


def _with_config(argv: list[str], config: str) -> list[str]:
    return [config if i > 0 and argv[i - 1] == "--config" else a for i, a in enumerate(argv)]


def test_a_directory_in_walk_order_in_any_order(
    bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = _tree(tmp_path / "tree"), tmp_path / "sigs.jsonl"
    pub = write_pubkey(bed, tmp_path / "pub.pem")
    assert run(capsys, sign_args(bed, root, out))[0] == 0
    ids = [e["id"] for e in entries(out)]
    assert sorted(ids) == sorted(FILES)
    assert [path_key(i) for i in ids] == sorted(path_key(i) for i in ids)  # written as walked
    lines = out.read_bytes().splitlines(keepends=True)
    random.Random(5).shuffle(lines)
    out.write_bytes(b"".join(lines))
    verify = ["verify", "--in", str(root), "--sigs", str(out), "--pubkey", str(pub)]
    code, text, _ = run(capsys, verify)
    assert code == 0 and f"records {len(FILES)}, valid {len(FILES)}" in text, text
    assert run_verify(root, out, pub, window=1, sort_bytes=1).ok

    (root / "a" / "x").write_text("changed\n")
    code, text, _ = run(capsys, sign_args(bed, root, out, "--resign-changed"))
    assert code == 0 and f"signed 1 (1 re-signed after a change), skipped {len(FILES) - 1}" in text, text
    (root / "a.txt").unlink()  # gone since: not an error for sign, an unknown id for verify
    code, text, _ = run(capsys, sign_args(bed, root, out))
    assert code == 0 and f"signed 0, skipped {len(FILES) - 1}" in text, text
    code, text, _ = run(capsys, verify)
    assert code == 1 and f"valid {len(FILES) - 1}, missing 0, duplicate 0" in text and "unknown: a.txt" in text
    # an id with NUL can name no file; its key must not be taken for one that does ("a/b/c")
    entry = next(e for e in entries(out) if e["id"] == "a/b/c")
    with out.open("a") as fh:
        fh.write(json.dumps({**entry, "id": "a\u0000\u0001b/c"}) + "\n")
    code, text, _ = run(capsys, verify)
    assert code == 1 and f"valid {len(FILES) - 1}, missing 0, duplicate 0" in text and "unknown ids 2" in text


def test_a_done_resume_starts_no_guard(bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With a config no guard can start with, a resume with nothing to sign still works:
    it never touched the HSM. The first record to sign needs the guard, and gets the error."""
    broken = _broken_config(bed, tmp_path)
    for source in (records_file(tmp_path, 300), _tree(tmp_path / "tree")):
        out, report = tmp_path / f"{source.name}.jsonl", tmp_path / "r.json"
        count = 300 if source.is_file() else len(FILES)
        assert run(capsys, sign_args(bed, source, out))[0] == 0
        before = out.read_bytes()
        code, text, _ = run(capsys, _with_config(sign_args(bed, source, out, "--report", str(report)), broken))
        assert code == 0 and f"signed 0, skipped {count} (already signed)" in text, text
        assert json.loads(report.read_text())["recoveries"] == 0
        changed = source / "b" if source.is_dir() else source
        changed.write_text(changed.read_text().replace("content of b", "other").replace("number 3\n", "three\n"))
        code, text, err = run(capsys, _with_config(sign_args(bed, source, out), broken))
        assert code == 1 and "changed 1 (not re-signed)" in text and "--resign-changed" in err
        assert out.read_bytes() == before
        usage_error(
            capsys,
            _with_config(sign_args(bed, source, out, "--resign-changed"), broken),
            "no token labelled 'nope'",
        )
        usage_error(capsys, sign_args(bed, source, out, key="test-rsa"), "holds signatures by key", "test-rsa")
        assert out.read_bytes() == before


def test_lines_late_beyond_the_window_resume(bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = WINDOW + 600
    source, out = records_file(tmp_path, n), tmp_path / "sigs.jsonl"
    assert run(capsys, sign_args(bed, source, out))[0] == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[300:] + lines[:300]))  # the first 300 come last: sorted on disk
    code, text, _ = run(capsys, sign_args(bed, source, out))
    assert code == 0 and f"signed 0, skipped {n}" in text, text
    with source.open("a") as fh:
        fh.write("one more\n")
    code, text, _ = run(capsys, sign_args(bed, source, out))
    assert code == 0 and f"signed 1, skipped {n}" in text, text
    pub = write_pubkey(bed, tmp_path / "pub.pem")
    assert run_verify(source, out, pub, jobs=2).ok


def _signed5(bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path, list[bytes]]:
    source, out = records_file(tmp_path, 5), tmp_path / "sigs.jsonl"
    assert run(capsys, sign_args(bed, source, out))[0] == 0
    return source, out, out.read_bytes().splitlines(keepends=True)


def _replacing(line: bytes, replaces: int) -> bytes:
    return json.dumps({**json.loads(line), "replaces": replaces}).encode() + b"\n"


def test_the_first_wrong_line_is_named_in_file_order(
    bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out, (r1, r2, r3, r4, r5) = _signed5(bed, tmp_path, capsys)
    cases: list[tuple[list[bytes], list[str]]] = [
        (
            [r5, r1, r2, r3, r4, r2, b"garbage\n"],
            ["line 6: signs record '2' again (first on line 3) without \"replaces\""],
        ),
        ([r5, r1, b"garbage\n", r2, r3, r4, r2], ["line 3: is not JSON"]),
        ([r1, r2, r3, r4, r5, r4, r1], ["line 6: signs record '4' again (first on line 4)"]),
        ([_replacing(r1, 3), r2, r3, r4, r5], ["line 1: replaces line 3, which holds no signature of record '1'"]),
        (
            [r3, r2, r1, _replacing(r2, 1), r4, r5],
            ["line 4: replaces line 1, but the signature of record '2' is on line 2"],
        ),
        ([r2, r1, r3, r4, _replacing(r5, 2)], ["line 5: replaces line 2, which holds no signature of record '5'"]),
    ]
    for lines, words in cases:
        out.write_bytes(b"".join(lines))
        usage_error(capsys, sign_args(bed, source, out), f"--out {out}, ", *words, "choose another --out")
        assert out.read_bytes() == b"".join(lines)
    out.write_bytes(b"".join([r4, r2, r1, r5, r3, _replacing(r2, 2)]))  # out of order, and a good chain
    code, text, _ = run(capsys, sign_args(bed, source, out))
    assert code == 0 and "signed 0, skipped 5" in text, text


def test_every_change_is_in_the_report_and_the_first_20_on_screen(
    bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out, report = records_file(tmp_path, 30), tmp_path / "sigs.jsonl", tmp_path / "r.json"
    assert run(capsys, sign_args(bed, source, out))[0] == 0
    source.write_text(source.read_text().replace("record", "changed record"))
    code, text, err = run(capsys, sign_args(bed, source, out, "--report", str(report)))
    assert code == 1 and "changed 30 (not re-signed)" in text
    assert text.count("  changed ") == 20 and "... and 10 more changed (all listed in --report)" in text
    assert "30 record(s) changed" in err and "and 10 more;" in err
    data = json.loads(report.read_text())
    assert data["changes"] == [{"id": str(i), "line": i} for i in range(1, 31)] and data["changed"] == 30
