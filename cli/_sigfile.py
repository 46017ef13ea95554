"""The signature file as a resume point: read strictly, repair a torn tail, append.

Loading checks every line before anything is signed: each is a signature entry, with an
id of the input (a line number within its range, or a relative path), by one key,
mechanism and key fingerprint, and at most one signature in force per record (a later
line may supersede an earlier one only by naming it in ``replaces``). Only a last line
cut short (a kill mid-write) is tolerated: it is cut off and its record redone. The first
line that breaks a rule is named, whichever rule it breaks.

Memory stays flat for any number of records and either kind of input: nothing is kept
per record. The lines are read in record order (:mod:`p11guard.cli._keyorder`) when
``replaces`` has to be checked, and again by :meth:`SignatureFile.done`, which the sign
job joins with the records as it reads them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from p11guard.cli._keyorder import Item, Key, KeyOrder, line_id, line_key, path_key
from p11guard.cli._paths import UsageError, open_regular
from p11guard.cli._records import match_plain, parse_entry

__all__ = ["MAX_SIGNATURE_LINE", "SignatureFile", "record_key"]

#: No signature line is longer (an id path, a digest, an RSA signature, a fingerprint).
MAX_SIGNATURE_LINE = 64 * 1024
_ID_PREFIX = b'{"id":'
_LINE_ID = re.compile(rb"[1-9][0-9]{0,18}")
_SHA_FIELD = b'"sha256":"'


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def record_key(record_id: str, line_ids: bool) -> Key:
    """The key a record of the input sorts by (see :mod:`p11guard.cli._keyorder`)."""
    return int(record_id) if line_ids else path_key(record_id)


def recorded_sha256(line: bytes) -> str:
    """The ``sha256`` of a line :meth:`SignatureFile.load` accepted."""
    if b"\\" not in line and line.count(b'"sha256"') == 1:  # no escapes, one field: plain
        at = line.find(_SHA_FIELD)
        if at > 0:
            return line[at + len(_SHA_FIELD) : at + len(_SHA_FIELD) + 64].decode()
    return str(json.loads(line)["sha256"])


class SignatureFile:
    """The output of ``p11guard sign``.

    Args:
        path: the JSON-lines file (``--out``).
        source: the input (``--in``), for messages.
        records: how many records the input holds (line ids must be within it).
        line_ids: ids are line numbers (a file input), not paths (a directory input).
        folder: a temporary folder for lines out of record order (sorted on disk).
    """

    def __init__(self, path: Path, source: Path, records: int, line_ids: bool, folder: Path) -> None:
        self.path = path
        self.source = source
        self.records = records
        self.line_ids = line_ids
        self.lines = 0  #: good lines in the file
        self.torn = False
        self.first: tuple[str, str, str | None, str] | None = None  #: key, mechanism, key_sha256, input
        self._good_size = 0
        self._order = KeyOrder(folder)
        self._replaces = False  # some line has "replaces"
        self._error: UsageError | None = None  # the first line wrong on its own
        self._plain = 0  # lines of the plain form (see match_plain)
        self._plain_signer: tuple[bytes | Any, ...] | None = None  # as a plain line has it

    def _bad(self, n: int, problem: str) -> UsageError:
        return UsageError(
            f"--out {self.path}, line {n}: {problem}; refusing to resume: remove or fix that line, "
            "or choose another --out"
        )

    def load(self) -> None:
        """Read and check an existing file (see the module). Writes nothing.

        Raises:
            UsageError: naming the first line that is wrong, and what is wrong with it.
        """
        if not self.path.exists():
            return
        with open_regular(self.path, "--out") as fh:
            self._order.first_pass(self._checked(fh))
        error = self._error
        if error is not None or self._replaces or not self._order.ascending:
            chain = self._check_chains()  # over the lines before ``error``: an earlier line is named first
            if chain is not None:
                error = chain
        if error is not None:
            raise error

    def _checked(self, fh: BinaryIO) -> Iterator[Item]:
        """Every line, checked on its own, keyed; stops at the first wrong one (``_error``)."""
        try:
            yield from self._lines(fh)
        except UsageError as exc:
            self._error = exc

    def _lines(self, fh: BinaryIO) -> Iterator[Item]:
        offset = n = 0
        self.lines = 0
        while line := fh.readline(MAX_SIGNATURE_LINE + 1):
            n += 1
            plain = None
            if not line.endswith(b"\n"):
                if len(line) > MAX_SIGNATURE_LINE:
                    raise self._bad(n, f"is longer than {MAX_SIGNATURE_LINE} bytes")
                if line.startswith(_ID_PREFIX) or _ID_PREFIX.startswith(line):
                    self.torn = True  # the last line, cut short by a kill: redo its record
                    break
                entry, problem = None, "has no line ending and is not a signature line cut short"
            elif (plain := match_plain(line)) is not None:
                self._plain += 1
                key = self._take_plain(plain)
                if key is not None:  # the common case: no dict, no JSON
                    offset += len(line)
                    self.lines, self._good_size = n, offset
                    yield key, n, line
                    continue
                entry, problem = parse_entry(line)
            else:
                entry, problem = parse_entry(line)
            if entry is None:
                if n == 1:
                    raise UsageError(
                        f"--out {self.path} is not a p11guard signature file (line 1 {problem}); "
                        "refusing to append to it: choose another --out"
                    )
                raise self._bad(n, problem)
            key = self._take(n, entry)
            if plain is not None:
                self._plain_signer = plain.group(4, 5, 6)  # as _take accepted it
            offset += len(line)
            self.lines, self._good_size = n, offset
            yield key, n, line

    def _take_plain(self, plain: re.Match[bytes]) -> Key | None:
        """A plain line's key if it passes :meth:`_take` (same signer as the last plain line
        accepted, a good id); ``None``: let :meth:`_take` check it (and name the problem)."""
        if plain.group(4, 5, 6) != self._plain_signer:
            return None
        raw = plain[1]
        if self.line_ids:
            if not _LINE_ID.fullmatch(raw) or int(raw) > self.records:
                return None
            key: Key = int(raw)
        else:
            rid = raw.decode()
            if not rid or rid.startswith("/") or {"", ".", ".."} & set(rid.split("/")):
                return None
            key = path_key(rid)
        if plain[7] is not None:
            self._replaces = True
        return key

    def _take(self, n: int, entry: dict[str, Any]) -> Key:
        """Check one line's id and signer; its record's key."""
        rid: str = entry["id"]
        key: Key | None
        if self.line_ids:
            key = line_key(rid)
            if key is None:
                raise self._bad(n, f"id {_short(rid)} is not a line number")
            if key > self.records:
                raise self._bad(n, f"id {rid} is not a line of --in {self.source} (it has {self.records} lines)")
        elif not rid or rid.startswith("/") or "\0" in rid or {"", ".", ".."} & set(rid.split("/")):
            raise self._bad(n, f"id {_short(rid)} is not a path inside --in {self.source}")
        else:
            key = path_key(rid)
        signer = (entry["key"], entry["mechanism"], entry.get("key_sha256"), entry.get("input", "data"))
        if self.first is None:
            self.first = signer
        elif signer != self.first:
            raise self._bad(n, f"signed by {_signer(signer)}, but line 1 by {_signer(self.first)}")
        self._replaces = self._replaces or "replaces" in entry
        return key

    def _in_order(self) -> Iterator[tuple[Key, list[tuple[int, bytes]]]]:
        """The good lines (those :meth:`load` read) again, grouped by record, in record order."""
        with open_regular(self.path, "--out") as fh:
            items = ((self._key(line), n, line) for n, line in _numbered(fh, self.lines))
            yield from self._order.grouped(items)

    def _key(self, line: bytes) -> Key:
        rid = line_id(line)
        assert rid is not None  # checked by load
        return record_key(rid, self.line_ids)

    def _check_chains(self) -> UsageError | None:
        """The first line (in file order) that breaks a record's chain of ``replaces``."""
        first: tuple[int, UsageError] | None = None
        for _, lines in self._in_order():
            if len(lines) == 1 and b'"replaces"' not in lines[0][1]:
                continue
            previous: int | None = None
            for n, line in lines:
                if first is not None and n > first[0]:
                    break
                entry = parse_entry(line)[0]
                assert entry is not None
                problem = _chain_problem(entry, previous)
                if problem is not None:
                    first = (n, self._bad(n, problem))
                    break
                previous = n
        return None if first is None else first[1]

    def done(self) -> Iterator[tuple[Key, int, str]]:
        """Each record signed in the file, in record order: its key, the line of the
        signature in force, and the ``sha256`` that line records."""
        if self.lines == 0:
            return
        if self._order.ascending and not self._order.rest.count and self._plain == self.lines:
            yield from self._done_plain()  # one line per record, each plain: read it straight
            return
        for key, lines in self._in_order():
            n, line = lines[-1]  # the chains are checked: the last line is in force
            yield key, n, recorded_sha256(line)

    def _done_plain(self) -> Iterator[tuple[Key, int, str]]:
        start = len(b'{"id":"')
        with open_regular(self.path, "--out") as fh:
            for n in range(1, self.lines + 1):
                line = fh.readline(MAX_SIGNATURE_LINE + 1)
                end = line.index(b'"', start)  # then '","sha256":"' and 64 hex digits
                key = int(line[start:end]) if self.line_ids else path_key(line[start:end].decode())
                yield key, n, line[end + 12 : end + 76].decode()

    def check_signer(self, key: str, mechanism: str, key_sha256: str | None, input: str = "data") -> None:
        """Refuse to append signatures by another key, mechanism or key fingerprint, or of
        another input (records, or digests with ``--digest``)."""
        if self.first is None:
            return
        old_key, old_mech, old_fp, _ = self.first
        if (old_key, old_mech) != (key, mechanism):
            raise UsageError(
                f"--out {self.path} holds signatures by key {old_key!r} with {old_mech!r}, "
                f"not {key!r} with {mechanism!r}: choose another --out"
            )
        self._check_input(input)
        if old_fp != key_sha256:
            raise UsageError(
                f"--out {self.path} was signed by key {key!r} with fingerprint {old_fp or 'none recorded'}, "
                f"but key {key!r} now has fingerprint {key_sha256 or 'none (no public key)'}: "
                "use another --out, or the key that signed it"
            )

    def _check_input(self, input: str) -> None:
        assert self.first is not None
        old_input = self.first[3]
        if old_input != input:
            raise UsageError(
                f"--out {self.path} holds signatures of {_INPUTS[old_input]}, not of {_INPUTS[input]}: "
                f"{'add' if old_input == 'digest' else 'leave out'} --digest, or choose another --out"
            )

    def check_label(self, key: str, mechanism: str | None, input: str = "data") -> None:
        """What :meth:`check_signer` can check without the HSM: the key's label, the input,
        and the mechanism if one was given."""
        if self.first is None:
            return
        old_key, old_mech, _, _ = self.first
        if old_key != key or mechanism not in (None, old_mech):
            given = f" with {mechanism!r}" if mechanism else ""
            raise UsageError(
                f"--out {self.path} holds signatures by key {old_key!r} with {old_mech!r}, "
                f"not {key!r}{given}: choose another --out"
            )
        self._check_input(input)

    def open_for_append(self) -> BinaryIO:
        """Open for appending, after cutting a torn last line off."""
        if self.torn:
            with self.path.open("r+b") as fh:
                fh.truncate(self._good_size)
            self.torn = False
        return self.path.open("ab")


def _numbered(fh: BinaryIO, count: int) -> Iterator[tuple[int, bytes]]:
    """The first ``count`` lines and their numbers (lines appended since are not read)."""
    for n in range(1, count + 1):
        yield n, fh.readline(MAX_SIGNATURE_LINE + 1)


def _chain_problem(entry: dict[str, Any], previous: int | None) -> str | None:
    """What is wrong with a line given the line in force for its record before it."""
    rid: str = entry["id"]
    replaces = entry.get("replaces")
    if previous is None and replaces is not None:
        return f"replaces line {replaces}, which holds no signature of record {_short(rid)}"
    if previous is not None and replaces is None:
        return f'signs record {_short(rid)} again (first on line {previous}) without "replaces"'
    if previous is not None and replaces != previous:
        return f"replaces line {replaces}, but the signature of record {_short(rid)} is on line {previous}"
    return None


_INPUTS = {"data": "records", "digest": "digests (--digest)"}


def _signer(signer: tuple[str, str, str | None, str]) -> str:
    key, mechanism, fingerprint, input = signer
    over = " over digests" if input == "digest" else ""
    return f"key {key!r} with {mechanism!r}{over} (fingerprint {fingerprint or 'none'})"
