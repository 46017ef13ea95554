"""Sorting more than fits in memory: sorted runs in a temporary folder, merged.

Items are tuples of ints, bytes and strs (anything :mod:`marshal` writes). At most about
``max_bytes`` of them are held at once; beyond that a sorted run goes to a file, and the
runs are merged (at most :data:`FAN_IN` files open at once: more runs are merged in rounds).
"""

from __future__ import annotations

import heapq
import marshal
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["FAN_IN", "ExternalSort"]

#: At most this many run files are merged (open) at once.
FAN_IN = 64
_LEN = struct.Struct("<I")


def _cost(item: tuple[Any, ...]) -> int:
    """Roughly what an item costs in memory: its bytes and strs, and ~100 bytes around them."""
    return 100 + sum(len(x) for x in item if isinstance(x, bytes | str))


class ExternalSort:
    """Add items, then iterate them, sorted.

    Args:
        folder: where runs are written (the caller removes it).
        max_bytes: about how much memory the items held at once may take.
    """

    def __init__(self, folder: Path, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.count = 0
        self._held: list[tuple[Any, ...]] = []
        self._held_bytes = 0
        self._runs: list[Path] = []
        self._names = 0

    def add(self, item: tuple[Any, ...]) -> None:
        self._held.append(item)
        self._held_bytes += _cost(item)
        self.count += 1
        if self._held_bytes > self.max_bytes:
            self._spill()

    def _new_run(self) -> Path:
        self._names += 1
        return self.folder / f"run-{id(self):x}-{self._names}"

    def _spill(self) -> None:
        self._held.sort()
        self._runs.append(self._write(self._held))
        self._held, self._held_bytes = [], 0

    def _write(self, items: Iterable[tuple[Any, ...]]) -> Path:
        path = self._new_run()
        with path.open("wb", buffering=1 << 20) as fh:
            for item in items:
                blob = marshal.dumps(item)
                fh.write(_LEN.pack(len(blob)))
                fh.write(blob)
        return path

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """The items, sorted (again on every iteration)."""
        if not self._runs:
            self._held.sort()
            yield from list(self._held)
            return
        if self._held:
            self._spill()
        while len(self._runs) > FAN_IN:  # merge in rounds: never too many files open
            group, self._runs = self._runs[:FAN_IN], self._runs[FAN_IN:]
            self._runs.append(self._write(heapq.merge(*(_read(p) for p in group))))
            for p in group:
                p.unlink()
        yield from heapq.merge(*(_read(p) for p in self._runs))


def _read(path: Path) -> Iterator[tuple[Any, ...]]:
    with path.open("rb", buffering=1 << 16) as fh:
        while head := fh.read(_LEN.size):
            (size,) = _LEN.unpack(head)
            item: tuple[Any, ...] = marshal.loads(fh.read(size))
            yield item
