"""Paths the CLI reads and writes, checked before any work starts.

Inputs must be regular files (or, for ``--in``, a directory): a FIFO or a device would
block or never end. Outputs must be creatable or writable. Files are opened non-blocking
and checked again once open, so a path swapped for a FIFO in between cannot hang a run.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from p11guard.base import P11GuardError, file_kind

__all__ = [
    "UsageError",
    "check_distinct",
    "check_input_file",
    "check_output",
    "check_source",
    "file_kind",
    "open_regular",
    "read_regular",
    "temp_folder",
    "too_large",
]


class UsageError(P11GuardError):
    """Bad command-line input (exit code 2)."""


def _stat(path: Path, flag: str) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file or directory") from None
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None


def check_source(source: Path, flag: str = "--in") -> None:
    """Raise :class:`UsageError` unless ``source`` is a readable directory or regular file."""
    info = _stat(source, flag)
    if stat.S_ISDIR(info.st_mode):
        if not os.access(source, os.R_OK | os.X_OK):
            raise UsageError(f"{flag} {source}: directory is not readable")
        return
    check_input_file(source, flag, info)


def check_input_file(path: Path, flag: str, info: os.stat_result | None = None) -> None:
    """Raise :class:`UsageError` unless ``path`` is a readable regular file."""
    info = info or _stat(path, flag)
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(
            f"{flag} {path} is {file_kind(info.st_mode)}, not a regular file: give a regular file"
            + (" or a directory" if flag == "--in" else "")
        )
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path}: file is not readable")


def check_output(path: Path, flag: str, replaced: bool = False) -> None:
    """Raise :class:`UsageError` unless ``path`` can be written: an existing regular file we
    may write, or a new name in a folder we may write. ``replaced``: the file is written
    beside and renamed over ``path``, so its folder must be writable even if it exists."""
    folder = path.absolute().parent
    if os.path.lexists(path):
        info = _stat(path, flag)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{flag} {path} is {file_kind(info.st_mode)}, not a regular file: choose a file name")
        if not os.access(path, os.R_OK | os.W_OK):
            raise UsageError(f"{flag} {path} is not writable: choose another {flag} or fix its permissions")
        if not replaced:
            return
    try:
        folder_info = folder.stat()
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: folder {folder} does not exist; create it first") from None
    except NotADirectoryError:
        raise UsageError(f"{flag} {path}: {folder} is not a folder (a file is in its path)") from None
    except OSError as exc:
        raise UsageError(f"{flag} {path}: folder {folder}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(folder_info.st_mode):
        raise UsageError(f"{flag} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: folder {folder} is not writable: choose another {flag}")


def check_distinct(paths: dict[str, Path | None]) -> None:
    """No two of the named paths may be the same file (``--out`` over ``--in`` ...), and
    no output may lie inside an input directory (the first one named), where it would be
    one of the records it signs."""
    seen: dict[str, str] = {}
    source: str | None = None
    for flag, path in paths.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{flag} {path} is the same file as {seen[real]}: give different paths")
        if source is None:
            source = real if os.path.isdir(real) else ""
        elif source and real.startswith(source.rstrip("/") + "/"):
            raise UsageError(
                f"{flag} {path} is inside {next(iter(seen.values()))}, where it would be signed as a record: "
                "put it elsewhere"
            )
        seen[real] = f"{flag} {path}"


def _open(path: str | Path, nofollow: bool) -> tuple[int, os.stat_result]:
    """``os.open`` for reading that never blocks (a FIFO without a writer opens at once);
    returns the descriptor and the file's status."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags | (os.O_NOFOLLOW if nofollow else 0))
    return fd, os.fstat(fd)


def open_regular(path: Path, flag: str) -> BinaryIO:
    """Open a regular file for reading without blocking on a FIFO or a device.

    Raises:
        UsageError: the file cannot be opened or is not a regular file (named by ``flag``).
    """
    try:
        fd, info = _open(path, nofollow=False)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UsageError(f"{flag} {path} is {file_kind(info.st_mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path, limit: int) -> tuple[bytes | None, str | None]:
    """A record file's bytes, or ``(None, why not)``: not a regular file or larger than
    ``limit`` (both not read), or unreadable. Symbolic links are not followed."""
    try:
        fd, info = _open(path, nofollow=True)
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    try:
        if not stat.S_ISREG(info.st_mode):
            return None, f"{path} is {file_kind(info.st_mode)}, not a regular file: not read"
        if info.st_size > limit:
            return None, too_large(info.st_size, limit)
        chunks, size = [], 0
        while size <= limit:  # the size it had (and one byte more: did it grow?), to its end
            chunk = os.read(fd, min(limit + 1 - size, max(info.st_size + 1 - size, 1 << 16)))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    if size > limit:  # it grew since fstat
        return None, too_large(size, limit, at_least=True)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0], None


def too_large(size: int, limit: int, at_least: bool = False) -> str:
    """Why a record is not signed: it is larger than one PKCS#11 call can carry."""
    return (
        f"record of {'more than ' if at_least else ''}{size:,} bytes is larger than the {limit:,} bytes "
        "one PKCS#11 call through p11guard can carry (a frame is at most 16 MiB; this is fixed): "
        "sign it another way or split it"
    )


@contextmanager
def temp_folder(prefix: str) -> Iterator[Path]:
    """A temporary folder (in ``$TMPDIR``), removed afterwards.

    Raises:
        UsageError: it cannot be made.
    """
    try:
        made = tempfile.TemporaryDirectory(prefix=prefix)
    except OSError as exc:
        raise UsageError(
            f"cannot make a temporary folder in {tempfile.gettempdir()}: {exc.strerror or exc}; "
            "set TMPDIR to a folder you may write"
        ) from None
    with made as name:
        yield Path(name)
