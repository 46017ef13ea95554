"""What ``p11guard verify`` found: counts, the first ids of each kind, and all of them on disk.

Memory stays flat however many records are wrong: the report holds counts and the first
:data:`SHOWN` ids of each kind; with a spool folder every id also goes to a file of its
kind as it is found, and :meth:`VerifyReport.write` streams them into the ``--report`` JSON.
Ids come in record order (``unknown`` sorted by id, ``malformed_lines`` by line number).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from p11guard.cli._paths import UsageError

__all__ = ["KINDS", "SHOWN", "VerifyReport"]

#: The kinds of problem, in the order the summary lists them.
KINDS = ("missing", "duplicate", "invalid", "tampered", "wrong_key", "unknown", "malformed_lines")
#: How many ids of each kind the summary names (``--report`` has all).
SHOWN = 20


class VerifyReport:
    """Counts and the first ids of each kind; all ids spooled to ``spool`` if given."""

    def __init__(self, spool: Path | None = None) -> None:
        self.records = 0
        self.valid = 0
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.shown: dict[str, list[str | int]] = {kind: [] for kind in KINDS}
        self._spool = spool
        self._files: dict[str, IO[str]] = {}

    def add(self, kind: str, item: str | int) -> None:
        """One record (or line number, for ``malformed_lines``) of ``kind``."""
        self.counts[kind] += 1
        if len(self.shown[kind]) < SHOWN:
            self.shown[kind].append(item)
        if self._spool is not None:
            fh = self._files.get(kind)
            if fh is None:
                fh = self._files[kind] = (self._spool / f"{kind}.jsonl").open("w", buffering=1 << 16)
            fh.write(json.dumps(item) + "\n")

    def count(self, kind: str) -> int:
        return self.counts[kind]

    @property
    def ok(self) -> bool:
        return self.valid == self.records and not any(self.counts.values())

    def summary(self) -> str:
        c = self.counts
        lines = [
            f"records {self.records}, valid {self.valid}, missing {c['missing']}, "
            f"duplicate {c['duplicate']}, invalid {c['invalid']}, tampered {c['tampered']}"
            + (f", wrong key {c['wrong_key']}" if c["wrong_key"] else "")
            + (f", unknown ids {c['unknown']}" if c["unknown"] else "")
            + (f", malformed lines {c['malformed_lines']}" if c["malformed_lines"] else "")
        ]
        for kind in KINDS:
            if c[kind]:
                more = f" ... and {c[kind] - SHOWN} more" if c[kind] > SHOWN else ""
                name = "malformed lines" if kind == "malformed_lines" else kind
                lines.append(f"  {name}: {', '.join(map(str, self.shown[kind]))}{more}")
        lines.append("OK: every record has exactly one valid signature" if self.ok else "FAILED")
        return "\n".join(lines)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()

    def write(self, path: Path) -> None:
        """The whole report as JSON (every id of every kind), streamed from the spool,
        written beside ``path`` and renamed over it."""
        self.close()
        tmp = path.with_name(path.name + ".tmp")
        head = {"records": self.records, "valid": self.valid, "ok": self.ok, "counts": self.counts}
        try:
            with tmp.open("w", buffering=1 << 16) as out:
                out.write(json.dumps(head)[:-1])
                for kind in KINDS:
                    out.write(f', "{kind}": [')
                    if self.counts[kind] and self._spool is not None:
                        with (self._spool / f"{kind}.jsonl").open() as fh:
                            for i, line in enumerate(fh):
                                out.write((", " if i else "") + line.rstrip("\n"))
                    out.write("]")
                out.write("}\n")
            tmp.replace(path)
        except OSError as exc:
            raise UsageError(f"--report {path}: cannot write it: {exc.strerror or exc}") from None
