"""An output directory of part files: ``DIR/manifest.json`` and ``DIR/part-NNNNN.jsonl``.

``p11guard sign --dask`` writes one part per partition (see :mod:`p11guard.cli._partplan`),
all or nothing: to a unique temporary name, flushed to disk, renamed over its final name,
and the folder flushed too. So a part file exists if and only if its partition is done,
with a signature line for every record of it (the lines of ``p11guard sign``: ``id``,
``sha256``, ``signature``, ``key``, ``mechanism``, ``key_sha256``), in record order.
Temporary files left by a kill are removed when a run starts.

The manifest names the input (its identity), the partition size, the key, its fingerprint
and the mechanism: a re-run that does not match it is refused with the reason.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from p11guard.cli._paths import UsageError, open_regular

__all__ = [
    "FORMAT",
    "MANIFEST",
    "Manifest",
    "done_parts",
    "iter_part_lines",
    "merge_parts",
    "part_name",
    "remove_stale_temps",
    "write_atomic",
    "write_part",
]

FORMAT = "p11guard-parts/1"
MANIFEST = "manifest.json"
_PART = re.compile(r"part-([0-9]{5,})\.jsonl")
_TEMP = re.compile(r"\.(part-[0-9]{5,}\.jsonl|manifest\.json)\.[0-9a-f]{32}\.tmp")


def part_name(k: int) -> str:
    return f"part-{k:05d}.jsonl"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` as ``path``, all or nothing: a unique temporary name beside it,
    fsync, ``os.replace``, fsync the folder. Raises ``OSError``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def write_part(folder: Path, k: int, lines: bytes) -> Path:
    """Write partition ``k``'s signature lines as its part file (see the module)."""
    path = folder / part_name(k)
    write_atomic(path, lines)
    return path


def remove_stale_temps(folder: Path) -> int:
    """Remove the temporary files a killed run left; returns how many."""
    removed = 0
    for entry in os.scandir(folder):
        if _TEMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def done_parts(folder: Path, partitions: int | None = None) -> set[int]:
    """The partitions whose part file exists. With ``partitions``: a part beyond them is
    refused (:class:`UsageError`): the folder is not this run's."""
    done: set[int] = set()
    for entry in os.scandir(folder):
        match = _PART.fullmatch(entry.name)
        if match is None:
            continue
        k = int(match.group(1))
        if partitions is not None and k >= partitions:
            raise UsageError(
                f"--out {folder} holds {entry.name}, but the input has only {partitions} partitions: "
                "it is another run's output; choose another --out"
            )
        done.add(k)
    return done


@dataclass
class Manifest:
    """What an output directory was made from (see the module)."""

    source: dict[str, Any]
    records: int
    partition_size: int
    partitions: int
    key: str
    mechanism: str
    key_sha256: str | None
    format: str = FORMAT

    @classmethod
    def load(cls, folder: Path) -> Manifest | None:
        """The manifest of ``folder``, ``None`` if it has none. Raises :class:`UsageError`
        for a file that is not one."""
        path = folder / MANIFEST
        if not path.exists():
            return None
        with open_regular(path, "--out manifest") as fh:
            raw = fh.read(1 << 20)
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, not {FORMAT!r}")
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(
                f"--out {folder}: {MANIFEST} is not a p11guard manifest ({exc}): choose another --out"
            ) from None

    def write(self, folder: Path) -> None:
        write_atomic(folder / MANIFEST, json.dumps(asdict(self), indent=2).encode() + b"\n")

    def mismatch(self, new: Manifest) -> str | None:
        """Why ``new`` (this run) cannot continue the output this manifest describes."""
        old_src, new_src = self.source, new.source
        if old_src.get("path") != new_src.get("path"):
            return f"it was made from {old_src.get('path')}, not {new_src.get('path')}"
        for name in ("kind", "records", "size", "mtime_ns", "head_sha256", "tail_sha256", "listing_sha256"):
            if old_src.get(name) != new_src.get(name):
                return (
                    f"the input changed since it was made ({name} {old_src.get(name)} -> {new_src.get(name)}), "
                    "so its partitions would not be the same records"
                )
        if self.partition_size != new.partition_size:
            return f"it was made with --partition-size {self.partition_size}, not {new.partition_size}"
        if (self.key, self.mechanism) != (new.key, new.mechanism):
            return (
                f"it holds signatures by key {self.key!r} with {self.mechanism!r}, "
                f"not {new.key!r} with {new.mechanism!r}"
            )
        if self.key_sha256 != new.key_sha256:
            return (
                f"key {self.key!r} had fingerprint {self.key_sha256 or 'none'} there, "
                f"but now has {new.key_sha256 or 'none'} (the key was replaced)"
            )
        return None


def iter_part_lines(folder: Path) -> Iterator[tuple[str, int, bytes]]:
    """``(part name, line number, line)`` of every part file of ``folder``, in partition
    order (record order); lines keep their endings, a line longer than 64 KiB is cut."""
    parts = sorted((int(m.group(1)), e.name) for e in os.scandir(folder) if (m := _PART.fullmatch(e.name)))
    for _, name in parts:
        with open_regular(folder / name, "--sigs") as fh:
            n = 0
            while line := fh.readline(64 * 1024 + 1):
                n += 1
                yield name, n, line
                if not line.endswith(b"\n"):
                    while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass


def merge_parts(folder: Path, out: Path) -> tuple[int, list[int]]:
    """Write every part of ``folder`` into ``out`` (one JSONL in record order), atomically.
    Returns the number of parts merged and the partitions missing (by the manifest)."""
    manifest = Manifest.load(folder)
    if manifest is None:
        raise UsageError(f"{folder} has no {MANIFEST}: not a `p11guard sign --dask` output directory")
    done = done_parts(folder, manifest.partitions)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("xb") as fh:
            for k in sorted(done):
                with open_regular(folder / part_name(k), "--sigs") as part:
                    while chunk := part.read(1 << 20):
                        fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"--out {out}: cannot write it: {exc.strerror or exc}") from None
    return len(done), sorted(set(range(manifest.partitions)) - done)
