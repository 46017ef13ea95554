"""``p11guard verify``: check a signature file against its records, with no HSM.

Uses the ``cryptography`` package only: every record must have exactly one valid
signature in force (a line with ``replaces`` supersedes the line it names: the later line
wins, the replaced one is no duplicate). Reports missing, duplicate, invalid, tampered and
wrong-key records (a recorded ``key_sha256`` that is not ``--pubkey``'s) by id, ids of no
record (``unknown``) and lines that are no signature entry.

Streams, with memory flat in the number of records: the signature file is read twice in
record order (:mod:`p11guard.cli._keyorder`: a window puts lines a little out of place
back, lines far out of place are sorted on disk), joined with the records as they are
read, and the checks run in chunks on ``jobs`` processes (:mod:`p11guard.cli._verifypool`).
``--sigs`` may also be the part files of a ``sign --dask`` run (a directory with its
manifest): their lines are numbered on across parts, in partition order.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from p11guard.cli._extsort import ExternalSort
from p11guard.cli._keyinfo import pem_fingerprint
from p11guard.cli._keyorder import WINDOW, Item, Key, KeyOrder, line_id, line_key, path_key
from p11guard.cli._parts import MANIFEST, iter_part_lines
from p11guard.cli._paths import (
    UsageError,
    check_distinct,
    check_input_file,
    check_output,
    check_source,
    open_regular,
    temp_folder,
)
from p11guard.cli._records import iter_records, parse_entry
from p11guard.cli._sigfile import MAX_SIGNATURE_LINE
from p11guard.cli._verifypool import Checker
from p11guard.cli._verifyreport import VerifyReport
from p11guard.cli._verifywork import GOOD, INVALID, MALFORMED, TAMPERED, UNREAD, WRONG_KEY, Task, verify_signature

__all__ = ["MAX_JOBS", "VerifyReport", "default_jobs", "run_verify", "verify_signature"]

MAX_JOBS = 256
_MAX_PEM = 1 << 20
#: A task's bookkeeping: the record's id and the line numbers of the lines sent.
_Meta = tuple[str, tuple[int, ...]]


def default_jobs() -> int:
    """One process per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _load_public_key(path: Path) -> tuple[Any, bytes, str]:
    """The public key, its PEM and its fingerprint."""
    with open_regular(path, "--pubkey") as fh:
        pem = fh.read(_MAX_PEM + 1)
    if len(pem) > _MAX_PEM:
        raise UsageError(f"--pubkey {path} is larger than {_MAX_PEM} bytes: not a PEM public key")
    try:
        return load_pem_public_key(pem), pem, pem_fingerprint(pem)
    except ValueError as exc:
        raise UsageError(f"--pubkey {path} is not a PEM public key ({exc})") from None


def _in_force(found: list[tuple[int, dict[str, Any]]]) -> list[int]:
    """The lines of one record that are in force: a line naming another in ``replaces``
    supersedes it (lines in file order, so a chain of re-signs leaves the last)."""
    kept: list[int] = []
    for n, entry in found:
        replaces = entry.get("replaces")
        kept = [m for m in kept if m != replaces]
        kept.append(n)
    return kept


def _lines(sigs: Path) -> Iterator[tuple[int, bytes | None]]:
    """Each line of the signature file (or of a ``sign --dask`` output's parts, numbered
    on across them) and its number; ``None`` for one too long to be a signature line (its
    rest is skipped unread)."""
    if sigs.is_dir():
        for n, (_, _, line) in enumerate(iter_part_lines(sigs), 1):
            yield n, line if len(line) <= MAX_SIGNATURE_LINE else None
        return
    with open_regular(sigs, "--sigs") as fh:
        n = 0
        while line := fh.readline(MAX_SIGNATURE_LINE + 1):
            n += 1
            if len(line) <= MAX_SIGNATURE_LINE:
                yield n, line
                continue
            if not line.endswith(b"\n"):
                while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
            yield n, None


class _Verify:
    """One run: the join of records and signature lines, and what it found."""

    def __init__(self, source: Path, sigs: Path, folder: Path, report: VerifyReport) -> None:
        self.source, self.sigs, self.folder, self.report = source, sigs, folder, report
        self.dirs = source.is_dir()
        self.unknown = ExternalSort(folder)
        self.malformed = ExternalSort(folder)

    def key(self, record_id: str) -> Key | None:
        """The key of the record an id names; ``None`` if it can name none (path keys are
        one-to-one only for ids without NUL, which no path has)."""
        if self.dirs:
            return None if "\0" in record_id else path_key(record_id)
        return line_key(record_id)

    def keyed(self, keyless: Callable[[int, bytes | None], None]) -> Iterator[Item]:
        """The lines with a key of this input, in file order; the others go to ``keyless``."""
        for n, line in _lines(self.sigs):
            rid = None if line is None else line_id(line)
            key = None if rid is None else self.key(rid)
            if key is None:
                keyless(n, line)
            else:
                assert line is not None
                yield key, n, line

    def no_record(self, n: int, line: bytes | None) -> None:
        """A line that names no record: an unknown id, or no signature entry at all."""
        entry = None if line is None else parse_entry(line)[0]
        if entry is None:
            self.malformed.add((n,))
        else:
            rid: str = entry["id"]
            self.unknown.add((rid.encode("utf-8", "surrogatepass"), rid))

    def task(self, data: bytes | None, lines: list[tuple[int, bytes]]) -> tuple[tuple[int, ...], Task]:
        """The lines to check for a record: all in force (one line: the workers parse it)."""
        if len(lines) > 1:
            found: list[tuple[int, dict[str, Any]]] = []
            for n, line in lines:
                entry = parse_entry(line)[0]
                if entry is None:
                    self.malformed.add((n,))
                else:
                    found.append((n, entry))
            keep = set(_in_force(found))
            lines = [(n, line) for n, line in lines if n in keep]
        numbers = tuple(n for n, _ in lines)
        return numbers, (data if lines else None, tuple(line for _, line in lines))

    def done(self, meta: _Meta, codes: tuple[int, ...]) -> None:
        """A record's verdict, from its lines' codes (in record order)."""
        rid, numbers = meta
        report = self.report
        report.records += 1
        kept = []
        for n, code in zip(numbers, codes, strict=True):
            if code == MALFORMED:
                self.malformed.add((n,))
            else:
                kept.append(code)
        if not kept:
            report.add("missing", rid)
            return
        if len(kept) > 1:
            report.add("duplicate", rid)
        if kept[0] == UNREAD:
            report.add("invalid", rid)
            return
        for code in kept:
            if code != GOOD:
                report.add({TAMPERED: "tampered", WRONG_KEY: "wrong_key", INVALID: "invalid"}[code], rid)
        if kept == [GOOD]:
            report.valid += 1

    def run(self, order: KeyOrder, checker: Checker[_Meta]) -> None:
        order.first_pass(self.keyed(lambda n, line: None))
        lines = order.grouped(self.keyed(self.no_record))
        group = next(lines, None)
        previous: Key | None = None
        for record in iter_records(self.source):
            key: Key = path_key(record.id) if self.dirs else int(record.id)
            if previous is not None and key <= previous:  # type: ignore[operator]
                raise RuntimeError(f"p11guard verify: records out of order at {record.id!r} (a bug)")
            previous = key
            while group is not None and group[0] < key:  # type: ignore[operator]
                for n, line in group[1]:
                    self.no_record(n, line)
                group = next(lines, None)
            found: list[tuple[int, bytes]] = []
            if group is not None and group[0] == key:
                found, group = group[1], next(lines, None)
            numbers, task = self.task(record.data, found)
            checker.add((record.id, numbers), task)
        while group is not None:
            for n, line in group[1]:
                self.no_record(n, line)
            group = next(lines, None)
        checker.finish()
        last = None
        for _, rid in self.unknown:  # sorted by id, each once
            if rid != last:
                self.report.add("unknown", rid)
                last = rid
        for (n,) in self.malformed:
            self.report.add("malformed_lines", n)


def run_verify(
    source: Path,
    sigs: Path,
    pubkey: Path,
    jobs: int = 1,
    report_path: Path | None = None,
    window: int = WINDOW,
    sort_bytes: int = 32 * 1024 * 1024,
) -> VerifyReport:
    """Verify every record of ``source`` against the signature file ``sigs`` on ``jobs``
    processes; with ``report_path``, write every finding there as JSON."""
    check_source(source)
    if sigs.is_dir():
        if not (sigs / MANIFEST).is_file():
            raise UsageError(f"--sigs {sigs} is a directory without {MANIFEST}: not a `p11guard sign --dask` output")
    else:
        check_input_file(sigs, "--sigs")
    check_input_file(pubkey, "--pubkey")
    if report_path is not None:
        check_output(report_path, "--report", replaced=True)
        check_distinct({"--in": source, "--report": report_path})
        check_distinct({"--sigs": sigs, "--pubkey": pubkey, "--report": report_path})
    if not 1 <= jobs <= MAX_JOBS:
        raise UsageError(f"--jobs {jobs}: give a number of processes from 1 to {MAX_JOBS}")
    public_key, pem, fingerprint = _load_public_key(pubkey)
    with temp_folder("p11guard-verify-") as folder:
        report = VerifyReport(spool=folder if report_path is not None else None)
        job = _Verify(source, sigs, folder, report)
        try:
            with Checker[_Meta](jobs, pem, public_key, fingerprint, job.done) as checker:
                job.run(KeyOrder(folder, window, sort_bytes), checker)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise UsageError(
                f"verify stopped: {exc.strerror or exc}{where}; check --in, --sigs and the free space in "
                f"{tempfile.gettempdir()} (set TMPDIR to use another folder)"
            ) from None
        finally:
            report.close()
        if report_path is not None:
            report.write(report_path)
    return report
