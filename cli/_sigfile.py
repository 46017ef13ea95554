"""The signature file as a resume point: read strictly, repair a torn tail, append.

Loading checks every line before anything is signed: each is a signature entry, with an
id of the input (a line number within its range, or a relative path), by one key,
mechanism and key fingerprint, and at most one signature in force per record (a later
line may supersede an earlier one only by naming it in ``replaces``). Only a last line
cut short (a kill mid-write) is tolerated: it is cut off and its record redone.

Memory: for a file input, two arrays sized by the input's line count (12 bytes a line;
at most :data:`MAX_LINE_RECORDS` lines); for a directory, a dict of the ids done. The
recorded ``sha256`` is not kept: it is read back from the file when its record comes.
"""

from __future__ import annotations

import json
import re
from array import array
from pathlib import Path
from typing import Any, BinaryIO

from p11guard.cli._paths import UsageError, open_regular
from p11guard.cli._records import parse_entry

__all__ = ["MAX_LINE_RECORDS", "MAX_SIGNATURE_LINE", "SignatureFile"]

#: A file input resumes with at most this many lines (12 bytes of memory each).
MAX_LINE_RECORDS = 50_000_000
#: No signature line is longer (an id path, a digest, an RSA signature, a fingerprint).
MAX_SIGNATURE_LINE = 64 * 1024
_LINE_ID = re.compile(r"[1-9][0-9]{0,18}")
_ID_PREFIX = b'{"id":'


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


class SignatureFile:
    """The output of ``p11guard sign``.

    Args:
        path: the JSON-lines file (``--out``).
        source: the input (``--in``), for messages.
        records: how many records the input holds (line ids must be within it).
        line_ids: ids are line numbers (a file input), not paths (a directory input).
    """

    def __init__(self, path: Path, source: Path, records: int, line_ids: bool) -> None:
        if line_ids and records > MAX_LINE_RECORDS:
            raise UsageError(
                f"--in {source} has {records:,} lines; sign resumes at most {MAX_LINE_RECORDS:,} lines "
                "per file: split it"
            )
        self.path = path
        self.source = source
        self.records = records
        self.line_ids = line_ids
        self.lines = 0  #: good lines in the file
        self.torn = False
        self.first: tuple[str, str, str | None, str] | None = None  #: key, mechanism, key_sha256, input
        self._good_size = 0
        self._line_of: array[int] | None = None  # file inputs: line number per record, 0 = none
        self._offset_of: array[int] | None = None  # ... and where that line starts
        self._by_id: dict[str, tuple[int, int]] = {}  # directory inputs: (line, offset)
        self._reader: BinaryIO | None = None

    def _bad(self, n: int, problem: str) -> UsageError:
        return UsageError(
            f"--out {self.path}, line {n}: {problem}; refusing to resume: remove or fix that line, "
            "or choose another --out"
        )

    def load(self) -> None:
        """Read and check an existing file (see the module). Writes nothing.

        Raises:
            UsageError: naming the line and what is wrong with it.
        """
        if not self.path.exists():
            return
        with open_regular(self.path, "--out") as fh:
            offset = n = 0
            while line := fh.readline(MAX_SIGNATURE_LINE + 1):
                n += 1
                if not line.endswith(b"\n"):
                    if len(line) > MAX_SIGNATURE_LINE:
                        raise self._bad(n, f"is longer than {MAX_SIGNATURE_LINE} bytes")
                    if line.startswith(_ID_PREFIX) or _ID_PREFIX.startswith(line):
                        self.torn = True  # the last line, cut short by a kill: redo its record
                        break
                    entry, problem = None, "has no line ending and is not a signature line cut short"
                else:
                    entry, problem = parse_entry(line)
                if entry is None:
                    if n == 1:
                        raise UsageError(
                            f"--out {self.path} is not a p11guard signature file (line 1 {problem}); "
                            "refusing to append to it: choose another --out"
                        )
                    raise self._bad(n, problem)
                self._take(n, offset, entry)
                offset += len(line)
            self.lines = n - 1 if self.torn else n
            self._good_size = offset

    def _take(self, n: int, offset: int, entry: dict[str, Any]) -> None:
        rid: str = entry["id"]
        if self.line_ids:
            if not _LINE_ID.fullmatch(rid):
                raise self._bad(n, f"id {_short(rid)} is not a line number")
            if int(rid) > self.records:
                raise self._bad(n, f"id {rid} is not a line of --in {self.source} (it has {self.records} lines)")
        elif not rid or rid.startswith("/") or "\0" in rid or {"", ".", ".."} & set(rid.split("/")):
            raise self._bad(n, f"id {_short(rid)} is not a path inside --in {self.source}")
        signer = (entry["key"], entry["mechanism"], entry.get("key_sha256"), entry.get("input", "data"))
        if self.first is None:
            self.first = signer
        elif signer != self.first:
            raise self._bad(n, f"signed by {_signer(signer)}, but line 1 by {_signer(self.first)}")
        previous = self.latest(rid)
        replaces = entry.get("replaces")
        if previous is None and replaces is not None:
            raise self._bad(n, f"replaces line {replaces}, which holds no signature of record {_short(rid)}")
        if previous is not None and replaces is None:
            raise self._bad(n, f'signs record {_short(rid)} again (first on line {previous[0]}) without "replaces"')
        if previous is not None and replaces != previous[0]:
            raise self._bad(
                n, f"replaces line {replaces}, but the signature of record {_short(rid)} is on line {previous[0]}"
            )
        self._set(rid, n, offset)

    def _set(self, rid: str, line: int, offset: int) -> None:
        if not self.line_ids:
            self._by_id[rid] = (line, offset)
            return
        if self._line_of is None or self._offset_of is None:
            self._line_of = array("I", [0]) * (self.records + 1)
            self._offset_of = array("q", [0]) * (self.records + 1)
        self._line_of[int(rid)] = line
        self._offset_of[int(rid)] = offset

    def latest(self, record_id: str) -> tuple[int, int] | None:
        """The line number and offset of the signature in force for ``record_id``, if any."""
        if not self.line_ids:
            return self._by_id.get(record_id)
        if self._line_of is None or self._offset_of is None:
            return None
        n = int(record_id)
        if not 0 < n <= self.records or self._line_of[n] == 0:
            return None
        return self._line_of[n], self._offset_of[n]

    def recorded_sha256(self, record_id: str) -> str | None:
        """The ``sha256`` recorded for ``record_id`` (read back from the file), if done."""
        where = self.latest(record_id)
        if where is None:
            return None
        if self._reader is None:
            self._reader = open_regular(self.path, "--out")
        self._reader.seek(where[1])
        entry = json.loads(self._reader.readline(MAX_SIGNATURE_LINE + 1))
        return str(entry["sha256"])

    def check_signer(self, key: str, mechanism: str, key_sha256: str | None, input: str = "data") -> None:
        """Refuse to append signatures by another key, mechanism or key fingerprint, or of
        another input (records, or digests with ``--digest``)."""
        if self.first is None:
            return
        old_key, old_mech, old_fp, old_input = self.first
        if (old_key, old_mech) != (key, mechanism):
            raise UsageError(
                f"--out {self.path} holds signatures by key {old_key!r} with {old_mech!r}, "
                f"not {key!r} with {mechanism!r}: choose another --out"
            )
        if old_input != input:
            raise UsageError(
                f"--out {self.path} holds signatures of {_INPUTS[old_input]}, not of {_INPUTS[input]}: "
                f"{'add' if old_input == 'digest' else 'leave out'} --digest, or choose another --out"
            )
        if old_fp != key_sha256:
            raise UsageError(
                f"--out {self.path} was signed by key {key!r} with fingerprint {old_fp or 'none recorded'}, "
                f"but key {key!r} now has fingerprint {key_sha256 or 'none (no public key)'}: "
                "use another --out, or the key that signed it"
            )

    def open_for_append(self) -> BinaryIO:
        """Open for appending, after cutting a torn last line off."""
        if self.torn:
            with self.path.open("r+b") as fh:
                fh.truncate(self._good_size)
            self.torn = False
        return self.path.open("ab")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


_INPUTS = {"data": "records", "digest": "digests (--digest)"}


def _signer(signer: tuple[str, str, str | None, str]) -> str:
    key, mechanism, fingerprint, input = signer
    over = " over digests" if input == "digest" else ""
    return f"key {key!r} with {mechanism!r}{over} (fingerprint {fingerprint or 'none'})"
