"""Partitions of an input: fixed record ranges, and the input's identity.

A partition is ``partition_size`` consecutive records: line numbers for a file input,
relative paths in sorted order for a directory. The ranges depend only on the input and
the size, so a re-run finds the same partitions -- as long as the input is the same. Its
identity, recorded in the output's manifest, says whether it is:

- a file: its real path, size, ``mtime_ns``, and the SHA-256 of its first and last MiB
  (a change of size, time or either end is seen; a change in the middle that keeps the
  size and the modification time is not -- nothing short of hashing it all would see it);
- a directory: its real path, how many records, and the SHA-256 of the sorted listing of
  ``path, size, mtime_ns`` of every record below it.

For a file, the plan also holds the byte offset where each partition starts, so a worker
(with ``--shared-out``) reads its range without reading what comes before.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p11guard.cli._paths import check_source, open_regular
from p11guard.cli._records import MAX_RECORD, Record, file_record, read_lines

__all__ = ["DEFAULT_PARTITION_SIZE", "Plan", "make_plan", "partition_records"]

DEFAULT_PARTITION_SIZE = 2000
_MIB = 1 << 20


@dataclass
class Plan:
    """The partitions of ``source`` (see the module).

    ``offsets``: for a file, the byte offset of each partition's first line;
    ``files``: for a directory, ``(id, size, mtime_ns, regular)`` of each record, sorted.
    """

    source: Path
    lines: bool
    records: int
    partition_size: int
    identity: dict[str, Any]
    offsets: list[int] = field(default_factory=list)
    files: list[tuple[str, int, int, bool]] = field(default_factory=list)

    @property
    def partitions(self) -> int:
        return -(-self.records // self.partition_size)

    def bounds(self, k: int) -> tuple[int, int]:
        """Partition ``k``'s records as ``[start, end)`` indices (0-based)."""
        start = k * self.partition_size
        return start, min(start + self.partition_size, self.records)

    def ids(self, k: int) -> list[str]:
        """The record ids of partition ``k``, in order."""
        start, end = self.bounds(k)
        if self.lines:
            return [str(n) for n in range(start + 1, end + 1)]
        return [f[0] for f in self.files[start:end]]


def make_plan(source: Path, partition_size: int = DEFAULT_PARTITION_SIZE) -> Plan:
    """Read ``source`` once: count its records, find the partitions, note its identity."""
    check_source(source)
    real = os.path.realpath(source)
    if source.is_dir():
        files = sorted(_listing(source))
        digest = hashlib.sha256()
        for rid, size, mtime, regular in files:
            digest.update(f"{rid}\0{size}\0{mtime}\0{int(regular)}\n".encode("utf-8", "surrogateescape"))
        identity = {"path": real, "kind": "files", "records": len(files), "listing_sha256": digest.hexdigest()}
        return Plan(source, False, len(files), partition_size, identity, files=files)
    with open_regular(source, "--in") as fh:
        info = os.fstat(fh.fileno())
        records, offsets = _line_offsets(fh, partition_size)
        identity = {
            "path": real,
            "kind": "lines",
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "records": records,
            **_ends(fh, info.st_size),
        }
    return Plan(source, True, records, partition_size, identity, offsets=offsets)


def _listing(root: Path) -> Iterator[tuple[str, int, int, bool]]:
    """``(id, size, mtime_ns, regular)`` of every record below ``root`` (symbolic links are
    not records; FIFOs, devices and sockets are, and fail unread)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            try:
                info = path.lstat()
            except OSError:
                continue  # gone since listed
            if not stat.S_ISLNK(info.st_mode):
                rid = path.relative_to(root).as_posix()
                yield rid, info.st_size, info.st_mtime_ns, stat.S_ISREG(info.st_mode)


def _line_offsets(fh: Any, size: int) -> tuple[int, list[int]]:
    """How many lines the file holds (a last line without ending counts), and the byte
    offset of every ``size``-th line's start (line 1, ``size + 1``, ...)."""
    offsets = [0]
    count = pos = 0
    last = b"\n"
    while chunk := fh.read(_MIB):
        newlines = chunk.count(b"\n")
        if newlines:
            # line starts after newline number (count + j), j = 1..newlines; a partition
            # starts at line m * size + 1, i.e. after newline m * size
            first_m = count // size + 1
            last_m = (count + newlines) // size
            if first_m <= last_m:
                ends = list(itertools.accumulate(len(p) + 1 for p in chunk.split(b"\n")[:-1]))
                for m in range(first_m, last_m + 1):
                    start = pos + ends[m * size - count - 1]
                    offsets.append(start)
        count += newlines
        pos += len(chunk)
        last = chunk[-1:]
    records = count + (0 if last == b"\n" else 1)
    # an offset at the very end (the file ends right after a partition's last line) starts
    # no partition
    return records, offsets[: -(-records // size)]


def _ends(fh: Any, size: int) -> dict[str, str]:
    fh.seek(0)
    head = hashlib.sha256(fh.read(_MIB)).hexdigest()
    fh.seek(max(0, size - _MIB))
    tail = hashlib.sha256(fh.read(_MIB)).hexdigest()
    return {"head_sha256": head, "tail_sha256": tail}


def partition_records(plan: Plan, k: int, limit: int = MAX_RECORD) -> Iterator[Record]:
    """The records of partition ``k``, read now (a record over ``limit`` fails unread)."""
    start, end = plan.bounds(k)
    if plan.lines:
        yield from read_lines(plan.source, plan.offsets[k], start + 1, end - start, limit)
        return
    for rid, _size, _mtime, regular in plan.files[start:end]:
        yield file_record(rid, plan.source / rid, regular, limit)
