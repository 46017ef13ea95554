"""The summary of a ``p11guard sign`` run (printed, and written as JSON with ``--report``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
        if len(self.failures) > SHOWN:
            lines.append(f"  ... and {len(self.failures) - SHOWN} more (all listed in --report)")
        for change in self.changes[:SHOWN]:
            lines.append(f"  changed {change['id']}: differs from what line {change['line']} of --out signed")
        if len(self.changes) > SHOWN:
            lines.append(f"  ... and {len(self.changes) - SHOWN} more changed (all listed in --report)")
        return "\n".join(lines)

    def changed_line(self) -> str:
        """One line for stderr naming the first changed records and what to do."""
        ids = ", ".join(str(c["id"]) for c in self.changes[:SHOWN])
        more = f" and {self.changed - SHOWN} more" if self.changed > SHOWN else ""
        return (
            f"p11guard: {self.changed} record(s) changed since they were signed and were not re-signed: "
            f"{ids}{more}; check them, then re-run with --resign-changed to sign them again"
        )

    def write(self, path: Path) -> None:
        """Write as JSON, atomically (beside it, then renamed)."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
            tmp.replace(path)
        except OSError as exc:
            raise UsageError(f"--report {path}: cannot write it: {exc.strerror or exc} (--out is complete)") from None
