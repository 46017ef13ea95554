"""``p11guard sign``: stream records through ``Guard`` batches into a resumable JSONL file.

Exactly once: a record's line is written only after its signature came back; lines are
appended in input order, a batch at a time, and flushed; a re-run skips every record
whose signature is in the file and whose bytes still match the recorded ``sha256``, and
redoes a last line cut short by a kill. So after ``kill -9`` at any moment, a re-run
leaves exactly one signature in force per record.

A record changed since it was signed is reported and not skipped silently; with
``resign_changed`` it is signed again on a new line naming the line it ``replaces``.
A resume starts its guard only when it meets the first record to sign: one that finds
every record signed and unchanged never touches the HSM.
Batches hold at most ``workers.batch_size`` records and ``BATCH_BYTES``; a record
larger than ``MAX_RECORD`` fails alone, unread (see :mod:`p11guard.cli._records`).

A systematic error stops the run early: when the first :data:`STOP_AFTER` records tried
all fail with one user error (an unknown key, a mechanism the token lacks, a mechanism
that does not fit the key), the rest would too -- the run stops with one message, writes
nothing for them, and a re-run after the fix resumes. With ``digest`` each record is a
hex digest (``sha256sum``'s first word) and is signed as such (``sign_digest``).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from p11guard._guard import Guard
from p11guard.base import Config, GuardClosed, GuardFailed, RemoteError
from p11guard.cli._keyinfo import key_fingerprint, resolve_key
from p11guard.cli._paths import UsageError, check_distinct, check_output, temp_folder
from p11guard.cli._progress import make_progress
from p11guard.cli._records import (
    BATCH_BYTES,
    ITEM_OVERHEAD,
    Record,
    check_source,
    count_records,
    iter_records,
    parse_digest,
    signature_line,
)
from p11guard.cli._sigfile import SignatureFile, record_key
from p11guard.cli._signreport import SignReport
from p11guard.cli._timeline import Timeline, render, require_matplotlib
from p11guard.protocol import DIGEST_SIZES, MECHANISMS

__all__ = ["STOP_AFTER", "SignReport", "batches", "resolve_key", "run_sign"]

#: At most this much record data in flight (batches submitted, not yet written).
WINDOW_BYTES = 64 * 1024 * 1024
#: The run stops when this many records, the first tried, all fail with one user error.
STOP_AFTER = 8


class _Systematic(Exception):
    """The first records all failed alike: the run stops (the message says why and what to do)."""


def _outage_s(status: dict[str, Any], since: float) -> float:
    total = 0.0
    now = time.time()
    for outage in status.get("outages", []):
        end = outage["end"] or now
        start = max(outage["start"], since)
        total += max(0.0, end - start)
    return total


def _state_text(guard: Guard) -> str:
    """The group's state, and how many members serve when it lists several."""
    serving, total = guard.members_serving
    return guard.state if total <= 1 else f"{guard.state} ({serving}/{total} members)"


def run_sign(
    config: Config,
    key: str,
    source: Path,
    out: Path,
    mechanism: str | None = None,
    report_path: Path | None = None,
    quiet: bool = False,
    stream: TextIO | None = None,
    resign_changed: bool = False,
    timeline_path: Path | None = None,
    digest: bool = False,
) -> SignReport:
    """Sign every record of ``source`` not yet in ``out``. Raises :class:`UsageError`
    (and other :class:`P11GuardError`) before signing or writing anything if an input,
    an output path, or the existing ``out`` is bad."""
    check_source(source)
    check_output(out, "--out")
    if report_path is not None:
        check_output(report_path, "--report", replaced=True)
    if timeline_path is not None:
        require_matplotlib()
        check_output(timeline_path, "--timeline", replaced=True)
    check_distinct({"--in": source, "--out": out, "--report": report_path, "--timeline": timeline_path})
    started_wall, started = time.time(), time.monotonic()
    report = SignReport(records=count_records(source))
    line_ids = not source.is_dir()
    with temp_folder("p11guard-sign-") as tmp:
        if report_path is not None:
            report.spool = tmp
        sigfile = SignatureFile(out, source, report.records, line_ids, tmp)
        try:
            sigfile.load()
        except OSError as exc:  # the lines out of record order are sorted in ``tmp``
            raise UsageError(
                f"--out {out}: cannot read it in record order: {exc.strerror or exc}; lines out of order "
                f"are sorted in {tmp.parent} (TMPDIR): give it room"
            ) from None
        todo = _todo(iter_records(source), sigfile, report, resign_changed)
        if sigfile.first is not None and sigfile.first[2] is not None and timeline_path is None:
            # A resume: the file pins key, mechanism and fingerprint. Records already signed
            # and unchanged need no HSM; a guard starts only for the first record to sign.
            sigfile.check_label(key, mechanism, "digest" if digest else "data")
            first = next(todo, None)
            todo = itertools.chain([first] if first is not None else [], todo)
            if first is None:
                return _finish(report, started, report_path, timeline_path)
        with Guard(config) as guard:
            key_type, mech = resolve_key(guard, key, mechanism, digest)
            fingerprint = key_fingerprint(guard, key, key_type)
            sigfile.check_signer(key, mech, fingerprint, "digest" if digest else "data")
            progress = make_progress(report.records, f"signing with {key}", quiet, stream)
            timeline = Timeline(guard) if timeline_path is not None else None
            job = _Job(guard, config, key, mech, fingerprint, report, progress.update, timeline, digest)
            try:
                with sigfile.open_for_append() as fh:
                    job.run(todo, fh)
            finally:
                progress.close()
                if timeline is not None:
                    report.timeline = timeline.finish()
                status = guard.status()
                report.recoveries = status.get("counters", {}).get("recoveries", 0)
                report.outage_s = round(_outage_s(status, started_wall), 3)
        return _finish(report, started, report_path, timeline_path)


def _finish(report: SignReport, started: float, report_path: Path | None, timeline_path: Path | None) -> SignReport:
    report.elapsed_s = round(time.monotonic() - started, 3)
    report.ops_per_s = round(report.signed / report.elapsed_s, 1) if report.elapsed_s else 0.0
    if report_path is not None:
        report.write(report_path)
    if timeline_path is not None and report.timeline is not None:
        recoveries = f"{report.recoveries} recover{'y' if report.recoveries == 1 else 'ies'}"
        title = f"p11guard sign: {report.signed:,} signed, {recoveries}, outage {report.outage_s:.1f} s"
        render(report.timeline, timeline_path, title)
    return report


def _todo(records: Iterable[Record], sigfile: SignatureFile, report: SignReport, resign: bool) -> Iterator[Record]:
    """The records to sign: not done yet, or changed since and ``resign``. Skips (and
    counts) the others; notes the changed ones it does not re-sign, and fails the ones
    it cannot read. Records and the file's signatures are both in record order: joined
    as they are read."""
    done = sigfile.done()
    signed = next(done, None)
    for record in records:
        key = record_key(record.id, sigfile.line_ids)
        while signed is not None and signed[0] < key:  # type: ignore[operator]
            signed = next(done, None)  # a record no longer in the input: not an error for sign
        if signed is None or signed[0] != key:
            if record.data is None:
                report.fail(record.id, record.error or "not read")
            else:
                yield record
            continue
        _, line, recorded = signed
        if record.data is None:
            report.fail(record.id, f"{record.error} (signed on line {line} of --out; cannot check it is unchanged)")
        elif recorded == hashlib.sha256(record.data).hexdigest():
            report.skipped += 1
        elif resign:
            record.replaces = line
            yield record
        else:
            report.change(record.id, line)


def batches(records: Iterable[Record], count: int, max_bytes: int = BATCH_BYTES) -> Iterator[list[Record]]:
    """Batches of at most ``count`` records and ``max_bytes`` (a bigger record goes alone)."""
    batch: list[Record] = []
    size = 0
    for record in records:
        cost = len(record.data or b"") + ITEM_OVERHEAD
        if batch and (len(batch) >= count or size + cost > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(record)
        size += cost
    if batch:
        yield batch


class _Job:
    """One run's signing loop: a window of batches in flight, written in order."""

    def __init__(
        self,
        guard: Guard,
        config: Config,
        key: str,
        mech: str,
        fingerprint: str | None,
        report: SignReport,
        update: Callable[[int, str, int], None],
        timeline: Timeline | None = None,
        digest: bool = False,
    ) -> None:
        self.guard, self.key, self.mech, self.fingerprint = guard, key, mech, fingerprint
        self.digest = digest
        self.digest_name = MECHANISMS[mech].digest or "sha256"
        self.streak: tuple[str, int] | None = ("", 0)  # (error name, count) of the first tries; None: broken
        self.report, self.update, self.timeline = report, update, timeline
        self.batch_size = config.batch_size
        self.max_window = max(4, config.workers * 4)  # enough to keep every worker busy
        self.window: deque[tuple[list[Record], Future[list[Any]]]] = deque()
        self.in_flight = 0  # bytes of record data in the window: memory stays bounded
        self.last_done = time.time()

    def fail(self, record: Record, reason: str) -> None:
        self.report.fail(record.id, reason)

    def _item(self, record: Record) -> tuple[str, dict[str, Any]] | None:
        """The request for a record (``None``: a ``--digest`` record that holds no digest)."""
        assert record.data is not None
        if not self.digest:
            return ("sign", {"key": self.key, "data": record.data, "mechanism": self.mech})
        size = DIGEST_SIZES[self.digest_name]
        value = parse_digest(record.data, size)
        if value is None:
            self.fail(record, f"not a {self.digest_name.upper()} digest: --digest records are {2 * size} hex digits")
            return None
        return ("sign_digest", {"key": self.key, "digest": value, "mechanism": self.mech})

    def _tried(self, error: BaseException | None) -> None:
        """Count a record tried: the first ones all failing with one user error stop the run."""
        if self.streak is None:
            return
        name = error.name if isinstance(error, RemoteError) and error.kind == "user" else None
        if name is None or self.streak[0] not in ("", name):
            self.streak = None
            return
        self.streak = (name, self.streak[1] + 1)
        if self.streak[1] >= STOP_AFTER:
            assert isinstance(error, RemoteError)
            raise _Systematic(
                f"stopped: the first {STOP_AFTER} records tried all failed with {name}: {error.message}. "
                "The rest would fail alike: they were not signed and nothing was written for them; "
                "fix the cause (the key, --mechanism or the token), then run the same command again: it resumes"
            )

    def _tick(self) -> None:
        self.update(self.report.signed + self.report.skipped, _state_text(self.guard), self.guard.recoveries)

    def run(self, todo: Iterator[Record], fh: BinaryIO) -> None:
        frames = batches(todo, self.batch_size)
        try:
            for batch in frames:
                readable, items = [], []
                for record in batch:
                    if record.error is not None or record.data is None:
                        self.fail(record, record.error or "not read")
                    elif (item := self._item(record)) is not None:
                        readable.append(record)
                        items.append(item)
                if not readable:
                    continue
                self.window.append((readable, self.guard.submit_batch(items)))
                self.in_flight += sum(len(r.data or b"") for r in readable)
                while self.window and (
                    len(self.window) >= self.max_window or self.in_flight > WINDOW_BYTES or self.window[0][1].done()
                ):
                    self._write_head(fh)
            while self.window:
                self._write_head(fh)
        except _Systematic as stop:
            # What is in flight completes in the guard unwritten; nothing more is sent.
            self.report.stopped = str(stop)
            done = self.report.signed + self.report.skipped + self.report.failed + self.report.changed
            self.report.not_tried = max(0, self.report.records - done)
        except (GuardFailed, GuardClosed) as exc:
            # Nothing more can be signed in this run: every record not signed is failed,
            # with the reason; a re-run (after fixing the cause) resumes.
            for batch, _ in self.window:
                for record in batch:
                    self.fail(record, str(exc))
            for batch in frames:
                for record in batch:
                    self.fail(record, record.error or str(exc))

    def _write_head(self, fh: BinaryIO) -> None:
        batch, future = self.window[0]
        while True:
            try:
                results = future.result(timeout=0.5)
                break
            except FutureTimeout:
                self._tick()
            except (GuardFailed, GuardClosed):
                raise  # the batch stays in the window: it is failed with the rest
            except Exception as exc:  # the whole batch failed (deadline, ...)
                results = [exc] * len(batch)
                break
        self.window.popleft()
        self.in_flight -= sum(len(r.data or b"") for r in batch)
        now = time.time()
        if now - self.last_done > 1.0:
            self.report.stalls.append({"start": round(self.last_done, 3), "end": round(now, 3)})
        self.last_done = now
        lines = []
        for record, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                self.fail(record, str(result))
                self._tried(result)
                continue
            self._tried(None)
            assert record.data is not None
            lines.append(
                signature_line(
                    record.id, record.data, result, self.key, self.mech, self.fingerprint, record.replaces, self.digest
                )
            )
            self.report.signed += 1
            self.report.resigned += record.replaces is not None
        fh.write(b"".join(lines))
        fh.flush()
        if self.timeline is not None:
            self.timeline.signed(len(lines))
        self._tick()
