"""Records to sign, and the signature file (JSON lines) that makes a run resumable.

A record is a regular file below a directory (id: its path relative to the directory,
with ``/``) or a line of a file (id: its 1-based line number, the line without its
ending). The signature file holds one JSON object per record:
``{"id", "sha256", "signature", "key", "mechanism"}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p11guard.base import P11GuardError

__all__ = [
    "Record",
    "SignatureFile",
    "UsageError",
    "count_records",
    "iter_records",
    "signature_line",
]

_FIELDS = ("id", "sha256", "signature", "key", "mechanism")


class UsageError(P11GuardError):
    """Bad command-line input (exit code 2)."""


@dataclass
class Record:
    """One record: its id and its bytes, or the reason it could not be read."""

    id: str
    data: bytes | None
    error: str | None = None


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def count_records(source: Path) -> int:
    """How many records ``source`` holds (a directory's files, or a file's lines)."""
    if source.is_dir():
        return sum(1 for _ in _walk(source))
    count, last = 0, b"\n"
    with source.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (0 if last == b"\n" else 1)


def iter_records(source: Path) -> Iterator[Record]:
    """The records of ``source``, in a stable order, read lazily (memory stays flat)."""
    if source.is_dir():
        for path in _walk(source):
            rid = path.relative_to(source).as_posix()
            try:
                yield Record(rid, path.read_bytes())
            except OSError as exc:
                yield Record(rid, None, f"cannot read {path}: {exc.strerror or exc}")
        return
    with source.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if line.endswith(b"\n"):
                line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            yield Record(str(n), line)


def check_source(source: Path) -> None:
    """Raise :class:`UsageError` unless ``source`` is a readable directory or file."""
    if not source.exists():
        raise UsageError(f"--in {source}: no such file or directory")
    if source.is_dir():
        if not os.access(source, os.R_OK | os.X_OK):
            raise UsageError(f"--in {source}: directory is not readable")
    elif not os.access(source, os.R_OK):
        raise UsageError(f"--in {source}: file is not readable")


def signature_line(record_id: str, data: bytes, signature: bytes, key: str, mechanism: str) -> bytes:
    """One line of the signature file, with its newline."""
    return (
        json.dumps(
            {
                "id": record_id,
                "sha256": hashlib.sha256(data).hexdigest(),
                "signature": base64.b64encode(signature).decode("ascii"),
                "key": key,
                "mechanism": mechanism,
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A signature-file entry, or ``None`` if the line is not one."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not all(isinstance(entry.get(f), str) for f in _FIELDS):
        return None
    return entry


class SignatureFile:
    """The output of ``p11guard sign``: read what is done, repair a torn tail, append.

    Args:
        path: the JSON-lines file.
        key, mechanism: what this run signs with; an existing file made with others is refused.
        line_ids: ids are line numbers (a file input), not paths (a directory input).
    """

    def __init__(self, path: Path, key: str, mechanism: str, line_ids: bool) -> None:
        self.path = path
        self.key = key
        self.mechanism = mechanism
        self.line_ids = line_ids
        self.done_lines: bytearray = bytearray()  # line inputs: one byte per record number
        self.done_ids: set[str] = set()  # directory inputs
        self.torn = False
        self._good_size = 0

    def check(self) -> None:
        """Read an existing file: refuse one that is not ours; note a torn last line.

        Writes nothing (so a refused run leaves the file as it was).
        """
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise UsageError(f"--out {self.path} is a directory")
        try:
            fh = self.path.open("rb")
        except OSError as exc:
            raise UsageError(f"--out {self.path}: {exc.strerror or exc}") from None
        with fh:
            offset = 0
            for n, line in enumerate(fh, 1):
                if not line.endswith(b"\n") and line.startswith(b'{"id":'):
                    self.torn = True  # the last line, cut short by a kill: redo that record
                    break
                entry = parse_line(line)
                if entry is None:
                    raise UsageError(
                        f"--out {self.path} is not a p11guard signature file (line {n} is not one); "
                        "refusing to append to it: choose another --out"
                    )
                if entry["key"] != self.key or entry["mechanism"] != self.mechanism:
                    raise UsageError(
                        f"--out {self.path} holds signatures by key {entry['key']!r} with "
                        f"{entry['mechanism']!r}, not {self.key!r} with {self.mechanism!r}: "
                        "choose another --out"
                    )
                self._mark(entry["id"])
                offset += len(line)
            self._good_size = offset

    def _mark(self, record_id: str) -> None:
        if not self.line_ids:
            self.done_ids.add(record_id)
        elif record_id.isdigit():
            n = int(record_id)
            if n >= len(self.done_lines):
                self.done_lines.extend(b"\0" * (n + 1 - len(self.done_lines)))
            self.done_lines[n] = 1

    def is_done(self, record_id: str) -> bool:
        if self.line_ids:
            n = int(record_id)
            return n < len(self.done_lines) and self.done_lines[n] == 1
        return record_id in self.done_ids

    @property
    def done(self) -> int:
        return self.done_lines.count(1) + len(self.done_ids)

    def open_for_append(self) -> Any:
        """Open for appending, after cutting a torn last line off."""
        if self.torn:
            with self.path.open("r+b") as fh:
                fh.truncate(self._good_size)
        return self.path.open("ab")
