"""The summary of a ``p11guard sign`` run (printed, and written as JSON with ``--report``).

Memory stays flat however many records fail or changed: the report keeps the first
:data:`SHOWN` of each; with a spool folder every one also goes to a file as it comes, and
:meth:`SignReport.write` streams them into the JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from p11guard.cli._paths import UsageError

__all__ = ["SHOWN", "SignReport"]

#: How many failed or changed records the summary and stderr name (``--report`` has all).
SHOWN = 20


@dataclass
class SignReport:
    """What a run did. ``signed`` counts ``resigned`` (changed records signed again)."""

    records: int = 0
    signed: int = 0
    skipped: int = 0
    failed: int = 0
    changed: int = 0
    resigned: int = 0
    recoveries: int = 0
    outage_s: float = 0.0
    elapsed_s: float = 0.0
    ops_per_s: float = 0.0
    #: The first :data:`SHOWN` failed and changed records (all of them in ``--report``).
    failures: list[dict[str, str]] = field(default_factory=list)
    changes: list[dict[str, str | int]] = field(default_factory=list)
    stalls: list[dict[str, float]] = field(default_factory=list)
    #: With ``--timeline``: signatures per second and state changes (see ``_timeline``).
    timeline: dict[str, Any] | None = None
    #: Why the run stopped early (the first records all failed with one error), if it did.
    stopped: str | None = None
    #: Records not tried because the run stopped early.
    not_tried: int = 0
    #: With ``--dask``: ``total``, ``done_before``, ``signed``, ``skipped`` (found done when
    #: their task ran), ``failed`` (a list of ``{"k", "records", "reason"}``), ``size``.
    partitions: dict[str, Any] | None = None
    #: With ``--dask``: by worker address, its ``recoveries``, ``outages``, ``outage_s`` ...
    workers: dict[str, dict[str, Any]] | None = None
    #: Where every failed and changed record goes as well (for ``--report``), if set.
    spool: Path | None = field(default=None, repr=False, compare=False)
    _files: dict[str, IO[str]] = field(default_factory=dict, repr=False, compare=False)
    #: Entries noted by :meth:`fail` and :meth:`change` (the lists keep the first ones).
    _noted: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def fail(self, record_id: str, reason: str) -> None:
        """A record that was not signed, and why."""
        self.failed += 1
        self._note("failures", self.failures, {"id": record_id, "reason": reason})

    def change(self, record_id: str, line: int) -> None:
        """A record changed since line ``line`` of ``--out`` signed it (not re-signed)."""
        self.changed += 1
        self._note("changes", self.changes, {"id": record_id, "line": line})

    def _note(self, name: str, shown: list[Any], item: dict[str, Any]) -> None:
        self._noted[name] = self._noted.get(name, 0) + 1
        if len(shown) < SHOWN:
            shown.append(item)
        if self.spool is not None:
            fh = self._files.get(name)
            if fh is None:
                fh = self._files[name] = (self.spool / f"{name}.jsonl").open("w", buffering=1 << 16)
            fh.write(json.dumps(item) + "\n")

    @property
    def ok(self) -> bool:
        """Every record signed, none failed, none changed since it was signed."""
        return self.failed == 0 and self.changed == 0 and not self.stopped

    def summary(self) -> str:
        resigned = f" ({self.resigned} re-signed after a change)" if self.resigned else ""
        changed = f", changed {self.changed} (not re-signed)" if self.changed else ""
        not_tried = f", not tried {self.not_tried} (stopped early)" if self.stopped else ""
        lines = [
            f"records {self.records}, signed {self.signed}{resigned}, skipped {self.skipped} (already signed), "
            f"failed {self.failed}{changed}{not_tried}",
            f"recoveries {self.recoveries}, outage {self.outage_s:.1f} s, "
            f"elapsed {self.elapsed_s:.1f} s, {self.ops_per_s:,.0f} signatures/s",
        ]
        if self.stopped:  # one message, not the same failure once per record
            lines.append(f"  {self.stopped}")
            return "\n".join(lines)
        if self.partitions is not None:
            p = self.partitions
            lines.append(
                f"partitions {p['total']} of {p['size']} records: {p['done_before']} done before, "
                f"{p['signed']} signed, {p['skipped']} found done, {len(p['failed'])} failed"
            )
        for address, w in (self.workers or {}).items():
            gone = " (gone)" if w.get("gone") else ""
            lines.append(
                f"  worker {w.get('name')} {address}{gone}: recoveries {w.get('recoveries', 0)}, "
                f"outages {w.get('outages', 0)} ({w.get('outage_s', 0.0):.1f} s)"
            )
        for failure in self.failures[:SHOWN]:
            lines.append(f"  failed {failure['id']}: {failure['reason']}")
        if self._entries("failures") > SHOWN:
            lines.append(f"  ... and {self._entries('failures') - SHOWN} more (all listed in --report)")
        for change in self.changes[:SHOWN]:
            lines.append(f"  changed {change['id']}: differs from what line {change['line']} of --out signed")
        if self._entries("changes") > SHOWN:
            lines.append(f"  ... and {self._entries('changes') - SHOWN} more changed (all listed in --report)")
        return "\n".join(lines)

    def _entries(self, name: str) -> int:
        """How many entries of ``name`` there are: noted one by one, or (``--dask``, whose
        driver lists a partition's failures whole) the list itself."""
        return self._noted.get(name) or len(getattr(self, name))

    def changed_line(self) -> str:
        """One line for stderr naming the first changed records and what to do."""
        ids = ", ".join(str(c["id"]) for c in self.changes[:SHOWN])
        more = f" and {self.changed - SHOWN} more" if self.changed > SHOWN else ""
        return (
            f"p11guard: {self.changed} record(s) changed since they were signed and were not re-signed: "
            f"{ids}{more}; check them, then re-run with --resign-changed to sign them again"
        )

    def write(self, path: Path) -> None:
        """Write as JSON (every failed and changed record, from the spool), atomically
        (beside it, then renamed)."""
        for fh in self._files.values():
            fh.close()
        skip = ("failures", "changes", "spool", "_files", "_noted")
        head = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        tmp = path.with_name(path.name + ".tmp")
        try:
            with tmp.open("w", buffering=1 << 16) as out:
                out.write(json.dumps(head, indent=2)[:-2])
                for name, shown in (("failures", self.failures), ("changes", self.changes)):
                    out.write(f',\n  "{name}": [')
                    spooled = self.spool / f"{name}.jsonl" if self.spool is not None else None
                    if spooled is not None and spooled.exists():
                        with spooled.open() as fh:
                            for i, line in enumerate(fh):
                                out.write((", " if i else "") + line.rstrip("\n"))
                    else:
                        out.write(", ".join(json.dumps(item) for item in shown))
                    out.write("]")
                out.write("\n}\n")
            tmp.replace(path)
        except OSError as exc:
            raise UsageError(f"--report {path}: cannot write it: {exc.strerror or exc} (--out is complete)") from None
