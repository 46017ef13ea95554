"""A signature file's lines in record order, with bounded memory, in two passes.

Every record has a **key** that sorts like the input is read: a line's number (a file
input) or :func:`path_key` of its relative path (a directory input, walked sorted, files
before subfolders). ``p11guard sign`` writes lines in that order, so a signature file is
almost sorted: only records signed again (``replaces``), records redone by a later run,
and files edited by hand come late.

:class:`KeyOrder` takes the lines as ``(key, line number, line)`` twice, in the same file
order. The first pass passes them through a window of :data:`WINDOW` lines (a heap: a
line at most that far out of place is put back in place) and keeps the last key let
through; a line that leaves the window with a key not above it is *out of order* and goes
to an :class:`ExternalSort` (memory bounded, spilled to a temporary folder). The second
pass repeats the same decisions, so the lines in order come straight from the file again,
and merges them with the sorted rest: every line, ordered by (key, line number). A sorted
file costs no sorting and no copy.
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from p11guard.cli._extsort import ExternalSort

__all__ = ["WINDOW", "Item", "Key", "KeyOrder", "groups", "line_id", "line_key", "path_key"]

#: Lines at most this far out of place are put back in place without the external sort.
WINDOW = 4096

Key = int | bytes
#: A keyed line of the signature file: its record's key, its line number, the line.
Item = tuple[Key, int, bytes]

_LINE_ID = re.compile(r"[1-9][0-9]{0,18}")
_ID_PREFIX = b'{"id":"'


def line_key(record_id: str) -> int | None:
    """The key of a file input's record id (its line number), ``None`` if it is none."""
    return int(record_id) if _LINE_ID.fullmatch(record_id) else None


def path_key(record_id: str) -> bytes:
    """The key of a directory input's record id: sorts as the sorted walk reads them
    (at each level the files, by name, then the subfolders, by name). One key per id for
    ids without NUL (every path)."""
    parts = record_id.encode("utf-8", "surrogatepass").split(b"/")
    return b"".join(b"\x01" + p + b"\x00" for p in parts[:-1]) + b"\x00" + parts[-1] + b"\x00"


def line_id(line: bytes) -> str | None:
    """The ``id`` of a signature line, or ``None`` if it has no string ``id`` (JSON is
    parsed only when the line is not of the plain form ``sign`` writes)."""
    if line.startswith(_ID_PREFIX) and b"\\" not in line and line.count(b'"id"') == 1:
        end = line.find(b'"', len(_ID_PREFIX))
        if end > 0:  # no escapes, one "id": JSON would give exactly this string
            try:
                return line[len(_ID_PREFIX) : end].decode()
            except UnicodeDecodeError:
                return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    rid = entry.get("id") if isinstance(entry, dict) else None
    return rid if isinstance(rid, str) else None


class KeyOrder:
    """Two passes over the same keyed lines (see the module).

    Args:
        folder: a temporary folder for the external sort.
        window: how far out of place a line may be and still come straight from the file.
        sort_bytes: memory for the out-of-order lines before they spill to the folder.
    """

    def __init__(self, folder: Path, window: int = WINDOW, sort_bytes: int = 32 * 1024 * 1024) -> None:
        self.window = max(1, window)
        self.rest = ExternalSort(folder, sort_bytes)
        self.ascending = True  #: the first pass met every key above the one before it

    def _decide(self, items: Iterable[Item]) -> Iterator[tuple[bool, Item]]:
        """Each item, and whether it is in order. While keys only rise, a queue delays them
        (it is a valid heap); the first fall turns it into a heap."""
        held: deque[Item] = deque()
        heap: list[Item] | None = None
        last: Any = None  # a Key (int or bytes, never both in one file)
        previous: Any = None
        for item in items:
            if heap is None:
                if previous is not None and item[0] <= previous:
                    heap = list(held)  # ascending: already a heap
                    self.ascending = False
                else:
                    previous = item[0]
                    held.append(item)
                    if len(held) > self.window:
                        out = held.popleft()
                        last = out[0]  # a rising key: in order
                        yield True, out
                    continue
            heapq.heappush(heap, item)
            if len(heap) > self.window:
                out = heapq.heappop(heap)
                in_order = last is None or out[0] > last
                if in_order:
                    last = out[0]
                yield in_order, out
        remaining = held if heap is None else (heapq.heappop(heap) for _ in range(len(heap)))
        for out in remaining:
            in_order = last is None or out[0] > last
            if in_order:
                last = out[0]
            yield in_order, out

    def first_pass(self, items: Iterable[Item]) -> None:
        """Read the lines once: the out-of-order ones are kept, sorted, for the second."""
        for in_order, item in self._decide(items):
            if not in_order:
                self.rest.add(item)

    def second_pass(self, items: Iterable[Item]) -> Iterator[Item]:
        """The same lines again: all of them, by (key, line number)."""
        if self.ascending and not self.rest.count:
            return iter(items)  # they came in order: nothing to put back
        straight = (item for in_order, item in self._decide(items) if in_order)
        if not self.rest.count:
            return straight
        rest: Iterator[Item] = iter(self.rest)
        return heapq.merge(straight, rest)

    def grouped(self, items: Iterable[Item]) -> Iterator[tuple[Key, list[tuple[int, bytes]]]]:
        """:meth:`second_pass`, grouped by key (see :func:`groups`)."""
        if self.ascending and not self.rest.count:  # one line per key
            return ((key, [(n, line)]) for key, n, line in items)
        return groups(self.second_pass(items))


def groups(items: Iterable[Item]) -> Iterator[tuple[Key, list[tuple[int, bytes]]]]:
    """Lines in key order, as (key, [(line number, line), ...]) per key."""
    for key, group in itertools.groupby(items, key=lambda item: item[0]):
        yield key, [(n, line) for _, n, line in group]
