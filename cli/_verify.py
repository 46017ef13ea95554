"""``p11guard verify``: check a signature file (or a directory of part files from
``p11guard sign --dask``) against its records, with no HSM.

Uses the ``cryptography`` package only: every record must have exactly one valid
signature in force (a line with ``replaces`` supersedes the line it names: the later line
wins, the replaced one is no duplicate). Reports missing, duplicate, invalid, tampered and
wrong-key records (a recorded ``key_sha256`` that is not ``--pubkey``'s) by id.
"""

from __future__ import annotations

import base64
import hashlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from p11guard.cli._keyinfo import pem_fingerprint
from p11guard.cli._parts import MANIFEST, iter_part_lines
from p11guard.cli._paths import UsageError, check_input_file, check_source, open_regular
from p11guard.cli._records import iter_records, parse_digest, parse_entry
from p11guard.cli._sigfile import MAX_SIGNATURE_LINE
from p11guard.protocol import DIGEST_SIZES, MECHANISMS

__all__ = ["VerifyReport", "run_verify", "verify_signature"]


_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


def verify_signature(public_key: Any, mechanism: str, signature: bytes, data: bytes, digest: bool = False) -> bool:
    """``True`` if ``signature`` over ``data`` is valid for ``public_key`` and ``mechanism``
    (``digest``: ``data`` is the digest that was signed, as with ``sign --digest``)."""
    spec = MECHANISMS.get(mechanism)
    if spec is None or "sign" not in spec.uses:
        return False
    algorithm: Any = _HASHES[spec.digest] if spec.digest else None
    if digest:
        if algorithm is None or len(data) != algorithm.digest_size:
            return False
        algorithm = Prehashed(algorithm)
    try:
        if mechanism.startswith("ecdsa-") and isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(algorithm))
        elif mechanism.startswith("rsa-pkcs1-") and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif mechanism.startswith("rsa-pss-") and isinstance(public_key, rsa.RSAPublicKey):
            salt = DIGEST_SIZES[str(spec.digest)]
            public_key.verify(signature, data, padding.PSS(padding.MGF1(_HASHES[str(spec.digest)]), salt), algorithm)
        elif mechanism == "ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey) and not digest:
            public_key.verify(signature, data)
        else:
            return False  # the mechanism does not fit the key
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass
class VerifyReport:
    records: int = 0
    valid: int = 0
    missing: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    tampered: list[str] = field(default_factory=list)
    wrong_key: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    malformed_lines: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.valid == self.records and not (
            self.missing
            or self.duplicate
            or self.invalid
            or self.tampered
            or self.wrong_key
            or self.unknown
            or self.malformed_lines
        )

    def summary(self) -> str:
        lines = [
            f"records {self.records}, valid {self.valid}, missing {len(self.missing)}, "
            f"duplicate {len(self.duplicate)}, invalid {len(self.invalid)}, tampered {len(self.tampered)}"
            + (f", wrong key {len(self.wrong_key)}" if self.wrong_key else "")
            + (f", unknown ids {len(self.unknown)}" if self.unknown else "")
            + (f", malformed lines {len(self.malformed_lines)}" if self.malformed_lines else "")
        ]
        for name in ("missing", "duplicate", "invalid", "tampered", "wrong_key", "unknown"):
            ids: list[str] = getattr(self, name)
            if ids:
                more = f" ... and {len(ids) - 20} more" if len(ids) > 20 else ""
                lines.append(f"  {name}: {', '.join(ids[:20])}{more}")
        if self.malformed_lines:
            lines.append(f"  malformed lines: {', '.join(map(str, self.malformed_lines[:20]))}")
        lines.append("OK: every record has exactly one valid signature" if self.ok else "FAILED")
        return "\n".join(lines)


def _load_public_key(path: Path) -> tuple[Any, str]:
    """The public key and its fingerprint."""
    with open_regular(path, "--pubkey") as fh:
        pem = fh.read(_MAX_PEM + 1)
    if len(pem) > _MAX_PEM:
        raise UsageError(f"--pubkey {path} is larger than {_MAX_PEM} bytes: not a PEM public key")
    try:
        return load_pem_public_key(pem), pem_fingerprint(pem)
    except ValueError as exc:
        raise UsageError(f"--pubkey {path} is not a PEM public key ({exc})") from None


_MAX_PEM = 1 << 20


def _in_force(found: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The entries of one record that are in force: a line naming another in ``replaces``
    supersedes it (lines in file order, so a chain of re-signs leaves the last)."""
    kept: list[tuple[int, dict[str, Any]]] = []
    for n, entry in found:
        replaces = entry.get("replaces")
        kept = [(m, e) for m, e in kept if m != replaces]
        kept.append((n, entry))
    return [e for _, e in kept]


def _file_lines(sigs: Path) -> Iterator[bytes]:
    """The lines of a signature file (a line longer than any signature line is cut)."""
    with open_regular(sigs, "--sigs") as fh:
        while line := fh.readline(MAX_SIGNATURE_LINE + 1):
            yield line
            if not line.endswith(b"\n"):  # skip the rest of an overlong line
                while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass


def run_verify(source: Path, sigs: Path, pubkey: Path) -> VerifyReport:
    """Verify every record of ``source`` against the signature file ``sigs``."""
    check_source(source)
    parts = sigs.is_dir()
    if parts:
        if not (sigs / MANIFEST).is_file():
            raise UsageError(f"--sigs {sigs} is a directory without {MANIFEST}: not a `p11guard sign --dask` output")
    else:
        check_input_file(sigs, "--sigs")
    check_input_file(pubkey, "--pubkey")
    public_key, fingerprint = _load_public_key(pubkey)
    entries: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    report = VerifyReport()
    try:
        lines = (line for _, _, line in iter_part_lines(sigs)) if parts else _file_lines(sigs)
        for n, line in enumerate(lines, 1):  # a directory's parts count on, in partition order
            entry, _ = parse_entry(line) if len(line) <= MAX_SIGNATURE_LINE else (None, "")
            if entry is None:
                report.malformed_lines.append(n)
            else:
                entries[entry["id"]].append((n, entry))
    except OSError as exc:
        raise UsageError(f"--sigs {sigs}: {exc.strerror or exc}") from None
    for record in iter_records(source):
        report.records += 1
        found = _in_force(entries.pop(record.id, []))
        if not found:
            report.missing.append(record.id)
            continue
        if len(found) > 1:
            report.duplicate.append(record.id)
        if record.data is None:
            report.invalid.append(record.id)
            continue
        digest = hashlib.sha256(record.data).hexdigest()
        good = 0
        for entry in found:
            if entry["sha256"] != digest:
                report.tampered.append(record.id)
                continue
            if entry.get("key_sha256", fingerprint) != fingerprint:
                report.wrong_key.append(record.id)
                continue
            signature = base64.b64decode(entry["signature"], validate=True)
            signed = record.data
            if entry.get("input") == "digest":
                spec = MECHANISMS.get(entry["mechanism"])
                size = DIGEST_SIZES.get(str(spec.digest if spec is not None else None), 0)
                signed = parse_digest(record.data, size) or b""
            if verify_signature(public_key, entry["mechanism"], signature, signed, entry.get("input") == "digest"):
                good += 1
            else:
                report.invalid.append(record.id)
        if good == 1 and len(found) == 1:
            report.valid += 1
    report.unknown = sorted(entries)
    return report
