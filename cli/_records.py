"""Records to sign, and the lines of the signature file (JSON lines).

A record is a regular file below a directory (id: its path relative to the directory,
with ``/``) or a line of a file (id: its 1-based line number, the line without its
ending). Special files below a directory (FIFOs, devices, sockets) are records that fail
with a reason, never read; symbolic links are not records. A record larger than
:data:`MAX_RECORD` fails alone, unread.

The signature file holds one JSON object per line: ``id``, ``sha256``, ``signature``,
``key``, ``mechanism``, ``key_sha256`` (the SHA-256 of the key's SubjectPublicKeyInfo,
absent for a key without a public key), and ``replaces`` (the line number of the
signature it supersedes, only on a re-signed record) and ``input``: ``"digest"`` when the
record is a digest signed with ``--digest`` (absent: the record's bytes were signed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from p11guard.cli._paths import UsageError, check_source, file_kind, open_regular, read_regular, too_large

__all__ = [
    "BATCH_BYTES",
    "ITEM_OVERHEAD",
    "MAX_RECORD",
    "Record",
    "UsageError",
    "check_source",
    "count_records",
    "file_record",
    "iter_records",
    "match_plain",
    "parse_digest",
    "parse_entry",
    "read_lines",
    "signature_line",
]

#: The largest record one PKCS#11 call through p11guard carries: a frame (16 MiB,
#: ``p11guard.protocol.MAX_FRAME``) less room for the request around it.
MAX_RECORD = 16 * 1024 * 1024 - 64 * 1024
#: At most this much per batch frame, counting :data:`ITEM_OVERHEAD` per record.
BATCH_BYTES = 8 * 1024 * 1024
#: What each record adds to a batch besides its bytes: its request, and its signature in
#: the reply (a batch of many tiny records must not outgrow a frame either).
ITEM_OVERHEAD = 1024

_FIELDS = ("id", "sha256", "signature", "key", "mechanism")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TEXT = rb'"([\x20\x21\x23-\x5b\x5d-\x7e]*)"'  # printable ASCII, no quote, no backslash: no escapes
#: The plain form ``signature_line`` writes (ids and labels without escapes). Groups: id,
#: sha256, signature, key, mechanism, key_sha256, replaces.
_PLAIN = re.compile(
    rb'\{"id":' + _TEXT + rb',"sha256":"([0-9a-f]{64})","signature":"([A-Za-z0-9+/]*={0,2})"'
    rb',"key":'
    + _TEXT
    + rb',"mechanism":'
    + _TEXT
    + rb'(?:,"key_sha256":"([0-9a-f]{64})")?(?:,"replaces":([1-9][0-9]*))?\}\r?\n?\Z'
)


def match_plain(line: bytes) -> re.Match[bytes] | None:
    """The line's fields if it has the plain form (see ``_PLAIN``): then ``json.loads``
    and :func:`parse_entry`'s checks would accept it, with the same values."""
    plain = _PLAIN.match(line)
    return plain if plain is not None and len(plain[3]) % 4 == 0 else None  # base64: whole quads


@dataclass
class Record:
    """One record: its id and its bytes, or the reason it could not be read.

    ``replaces``: the line of the signature file this record's new signature supersedes
    (a changed record re-signed with ``--resign-changed``).
    """

    id: str
    data: bytes | None
    error: str | None = None
    replaces: int | None = None


def _walk(root: Path) -> Iterator[tuple[str, str, bool]]:
    """Every non-directory below ``root`` but symbolic links, sorted as ``os.walk`` with
    sorted names gives them (at each level the files, then the subfolders), as its id
    (the path relative to ``root``, with ``/``), its path, and whether it is a regular
    file. Types come from the directory listing: no ``stat`` per file."""
    pending: list[tuple[str, str]] = [(str(root), "")]  # folders to list: path, id prefix
    while pending:
        folder, prefix = pending.pop()
        names: list[str] = []  # files (one folder's names in memory at a time, as os.walk)
        odd: set[str] = set()  # ... of them, not regular files
        subfolders: list[str] = []
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    try:
                        if entry.is_symlink():
                            continue  # not a record, never followed
                        if entry.is_dir(follow_symlinks=False):
                            subfolders.append(entry.name)
                            continue
                        if not entry.is_file(follow_symlinks=False):
                            odd.add(entry.name)
                    except OSError:
                        continue  # gone since listed
                    names.append(entry.name)
        except OSError:
            continue  # unreadable or gone: as os.walk, skipped
        names.sort()
        for name in names:
            yield prefix + name, os.path.join(folder, name), name not in odd
        subfolders.sort(reverse=True)
        pending.extend((os.path.join(folder, name), f"{prefix}{name}/") for name in subfolders)


def count_records(source: Path) -> int:
    """How many records ``source`` holds (a directory's files, or a file's lines)."""
    if source.is_dir():
        return sum(1 for _ in _walk(source))
    count, last = 0, b"\n"
    with open_regular(source, "--in") as fh:
        while chunk := fh.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (0 if last == b"\n" else 1)


def iter_records(source: Path, limit: int = MAX_RECORD) -> Iterator[Record]:
    """The records of ``source``, in a stable order, read lazily (memory stays flat: a
    record over ``limit`` bytes is failed without being held)."""
    if source.is_dir():
        for rid, path, regular in _walk(source):
            yield file_record(rid, path, regular, limit)
        return
    with open_regular(source, "--in") as fh:
        yield from _lines(fh, limit)


def file_record(rid: str, path: str | Path, regular: bool, limit: int = MAX_RECORD) -> Record:
    """The record of a file of a directory input (``regular``: as its listing said); a
    file that is no regular file is failed unread, named with what it is."""
    if not regular:
        try:
            kind = file_kind(os.lstat(path).st_mode)
        except OSError:
            kind = "not a regular file"
        return Record(rid, None, f"{path} is {kind}, not a regular file: not read")
    data, error = read_regular(path, limit)
    return Record(rid, data, error)


def read_lines(source: Path, offset: int, first: int, count: int, limit: int = MAX_RECORD) -> Iterator[Record]:
    """``count`` line records of the file ``source`` from byte ``offset``, where line
    number ``first`` starts (a partition of a file input: see :mod:`p11guard.cli._partplan`)."""
    with open_regular(source, "--in") as fh:
        fh.seek(offset)
        yield from itertools.islice(_lines(fh, limit, first), count)


def _lines(fh: BinaryIO, limit: int, first: int = 1) -> Iterator[Record]:
    n = first - 1
    while line := fh.readline(limit + 3):
        n += 1
        if line.endswith(b"\n"):
            data = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        elif len(line) < limit + 3:
            data = line  # the last line, with no ending
        else:  # longer than any record can be: skip to its end, counting, keeping nothing
            size = len(line)
            while chunk := fh.readline(1 << 20):
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    size -= 2 if chunk.endswith(b"\r\n") else 1
                    break
            yield Record(str(n), None, too_large(size, limit))
            continue
        if len(data) > limit:
            yield Record(str(n), None, too_large(len(data), limit))
        else:
            yield Record(str(n), data)


def signature_line(
    record_id: str,
    data: bytes,
    signature: bytes,
    key: str,
    mechanism: str,
    key_sha256: str | None,
    replaces: int | None = None,
    digest: bool = False,
) -> bytes:
    """One line of the signature file, with its newline (``digest``: the record is the
    digest that was signed, marked ``"input": "digest"``)."""
    entry: dict[str, Any] = {
        "id": record_id,
        "sha256": hashlib.sha256(data).hexdigest(),
        "signature": base64.b64encode(signature).decode("ascii"),
        "key": key,
        "mechanism": mechanism,
    }
    if key_sha256 is not None:
        entry["key_sha256"] = key_sha256
    if replaces is not None:
        entry["replaces"] = replaces
    if digest:
        entry["input"] = "digest"
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def parse_entry(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """A signature-file entry and ``""``, or ``None`` and what is wrong with the line."""
    plain = match_plain(line)
    if plain is not None:  # the common case, ~4x faster than JSON
        rid, sha256, signature, key, mechanism, fingerprint, replaces = plain.groups()
        entry: dict[str, Any] = {
            "id": rid.decode(),
            "sha256": sha256.decode(),
            "signature": signature.decode(),
            "key": key.decode(),
            "mechanism": mechanism.decode(),
        }
        if fingerprint is not None:
            entry["key_sha256"] = fingerprint.decode()
        if replaces is not None:
            entry["replaces"] = int(replaces)
        return entry, ""
    try:
        entry = json.loads(line)
    except ValueError:
        return None, "is not JSON"
    if not isinstance(entry, dict):
        return None, "is not a JSON object"
    for name in _FIELDS:
        if not isinstance(entry.get(name), str):
            return None, f'has no string "{name}"'
    if not _HEX64.fullmatch(entry["sha256"]):
        return None, '"sha256" is not 64 lowercase hex digits'
    try:
        base64.b64decode(entry["signature"], validate=True)
    except (ValueError, binascii.Error):
        return None, '"signature" is not base64'
    fingerprint = entry.get("key_sha256")
    if fingerprint is not None and not (isinstance(fingerprint, str) and _HEX64.fullmatch(fingerprint)):
        return None, '"key_sha256" is not 64 lowercase hex digits'
    replaces = entry.get("replaces")
    if replaces is not None and (isinstance(replaces, bool) or not isinstance(replaces, int) or replaces < 1):
        return None, '"replaces" is not a line number'
    if entry.get("input", "data") not in ("data", "digest"):
        return None, '"input" is neither "data" nor "digest"'
    return entry, ""


def parse_digest(data: bytes, size: int) -> bytes | None:
    """The digest a ``--digest`` record holds: hex, the first word of the record (as
    ``sha256sum`` prints it), of ``size`` bytes; ``None`` if it holds no such digest."""
    words = data.split(None, 1)
    text = words[0] if words else b""
    if len(text) != 2 * size:
        return None
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
