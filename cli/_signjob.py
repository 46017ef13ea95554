"""``p11guard sign``: stream records through ``Guard`` batches into a resumable JSONL file.

Exactly once: a record's line is written only after its signature came back; lines are
appended in input order, a batch at a time, and flushed; a re-run skips every id already
in the file and redoes a last line cut short by a kill. So after ``kill -9`` at any
moment, a re-run leaves exactly one signature per record.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from p11guard._guard import Guard
from p11guard.base import Config, GuardClosed, GuardFailed
from p11guard.cli._progress import make_progress
from p11guard.cli._records import (
    Record,
    SignatureFile,
    UsageError,
    check_source,
    count_records,
    iter_records,
    signature_line,
)
from p11guard.protocol import MECHANISMS, default_mechanism

__all__ = ["SignReport", "resolve_key", "run_sign"]


@dataclass
class SignReport:
    """The summary of a run (also written as JSON with ``--report``)."""

    records: int = 0
    signed: int = 0
    skipped: int = 0
    failed: int = 0
    recoveries: int = 0
    outage_s: float = 0.0
    elapsed_s: float = 0.0
    ops_per_s: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    stalls: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"records {self.records}, signed {self.signed}, skipped {self.skipped} (already signed), "
            f"failed {self.failed}",
            f"recoveries {self.recoveries}, outage {self.outage_s:.1f} s, "
            f"elapsed {self.elapsed_s:.1f} s, {self.ops_per_s:,.0f} signatures/s",
        ]
        for failure in self.failures[:20]:
            lines.append(f"  failed {failure['id']}: {failure['reason']}")
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (all listed in --report)")
        return "\n".join(lines)


def resolve_key(guard: Guard, key: str, mechanism: str | None) -> tuple[str, str]:
    """Check the key exists and the mechanism fits it; returns (key type, mechanism)."""
    keys = {k["label"]: k for k in guard.list_keys()}
    if key not in keys or "private key" not in keys[key]["classes"]:
        labels = sorted(label for label, k in keys.items() if "private key" in k["classes"])
        raise UsageError(f"--key {key!r}: no private key with that label; labels: {labels or 'none'}")
    key_type = str(keys[key]["type"])
    mech = mechanism or default_mechanism(key_type)
    if mech not in MECHANISMS:
        raise UsageError(f"--mechanism {mech!r}: unknown; known: {', '.join(sorted(MECHANISMS))}")
    if key_type not in MECHANISMS[mech]:
        fits = sorted(m for m, types in MECHANISMS.items() if key_type in types)
        raise UsageError(f"--mechanism {mech!r} does not fit key {key!r} ({key_type}); use one of: {fits}")
    return key_type, mech


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
) -> SignReport:
    """Sign every record of ``source`` not yet in ``out``. Raises :class:`UsageError`
    (and other :class:`P11GuardError`) before writing anything if the input is bad."""
    check_source(source)
    if report_path is not None and report_path.is_dir():
        raise UsageError(f"--report {report_path} is a directory")
    started_wall, started = time.time(), time.monotonic()
    report = SignReport()
    with Guard(config) as guard:
        _, mech = resolve_key(guard, key, mechanism)
        sigfile = SignatureFile(out, key, mech, line_ids=not source.is_dir())
        sigfile.check()
        report.records = count_records(source)
        progress = make_progress(report.records, f"signing with {key}", quiet, stream)
        try:
            _sign_stream(guard, config, sigfile, source, key, mech, report, progress.update)
        finally:
            progress.close()
            status = guard.status()
            report.recoveries = status.get("counters", {}).get("recoveries", 0)
            report.outage_s = round(_outage_s(status, started_wall), 3)
    report.elapsed_s = round(time.monotonic() - started, 3)
    report.ops_per_s = round(report.signed / report.elapsed_s, 1) if report.elapsed_s else 0.0
    if report_path is not None:
        tmp = report_path.with_name(report_path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(report), indent=2) + "\n")
        tmp.replace(report_path)
    return report


def _batches(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _sign_stream(
    guard: Guard,
    config: Config,
    sigfile: SignatureFile,
    source: Path,
    key: str,
    mech: str,
    report: SignReport,
    update: Any,
) -> None:
    window: deque[tuple[list[Record], Future[list[Any]]]] = deque()
    max_window = max(4, config.workers * 4)  # enough to keep every worker busy; memory stays flat
    last_done = time.time()

    def fail(record: Record, reason: str) -> None:
        report.failed += 1
        report.failures.append({"id": record.id, "reason": reason})

    def write_head(fh: Any) -> None:
        nonlocal last_done
        batch, future = window[0]
        while True:
            try:
                results = future.result(timeout=0.5)
                break
            except FutureTimeout:
                update(report.signed + report.skipped, _state_text(guard), guard.recoveries)
            except (GuardFailed, GuardClosed):
                raise  # the batch stays in the window: it is failed with the rest
            except Exception as exc:  # the whole batch failed (deadline, ...)
                results = [exc] * len(batch)
                break
        window.popleft()
        now = time.time()
        if now - last_done > 1.0:
            report.stalls.append({"start": round(last_done, 3), "end": round(now, 3)})
        last_done = now
        lines = []
        for record, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                fail(record, str(result))
            else:
                assert record.data is not None
                lines.append(signature_line(record.id, record.data, result, key, mech))
                report.signed += 1
        fh.write(b"".join(lines))
        fh.flush()
        update(report.signed + report.skipped, _state_text(guard), guard.recoveries)

    todo = (r for r in iter_records(source) if not _skip(sigfile, r, report))
    with sigfile.open_for_append() as fh:
        try:
            for batch in _batches(todo, config.batch_size):
                readable = []
                for record in batch:
                    if record.error is not None:
                        fail(record, record.error)
                    else:
                        readable.append(record)
                if not readable:
                    continue
                items = [("sign", {"key": key, "data": r.data, "mechanism": mech}) for r in readable]
                window.append((readable, guard.submit_batch(items)))
                while len(window) >= max_window or (window and window[0][1].done()):
                    write_head(fh)
            while window:
                write_head(fh)
        except (GuardFailed, GuardClosed) as exc:
            # Nothing more can be signed in this run: every record not signed is failed,
            # with the reason; a re-run (after fixing the cause) resumes.
            for batch, _ in window:
                for record in batch:
                    fail(record, str(exc))
            for record in todo:
                fail(record, str(exc))


def _skip(sigfile: SignatureFile, record: Record, report: SignReport) -> bool:
    if sigfile.is_done(record.id):
        report.skipped += 1
        return True
    return False
