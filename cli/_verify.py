"""``p11guard verify``: check a signature file against its records, with no HSM.

Uses the ``cryptography`` package only: every record must have exactly one valid
signature. Reports missing, duplicate, invalid and tampered records by id.
"""

from __future__ import annotations

import base64
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from p11guard.cli._records import UsageError, check_source, iter_records, parse_line

__all__ = ["VerifyReport", "run_verify", "verify_signature"]


def verify_signature(public_key: Any, mechanism: str, signature: bytes, data: bytes) -> bool:
    """``True`` if ``signature`` over ``data`` is valid for ``public_key`` and ``mechanism``."""
    try:
        if mechanism in ("ecdsa-sha256", "ecdsa-sha384") and isinstance(public_key, ec.EllipticCurvePublicKey):
            digest = hashes.SHA256() if mechanism == "ecdsa-sha256" else hashes.SHA384()
            public_key.verify(signature, data, ec.ECDSA(digest))
        elif mechanism == "rsa-pkcs1-sha256" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif mechanism == "rsa-pss-sha256" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        elif mechanism == "ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey):
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
    unknown: list[str] = field(default_factory=list)
    malformed_lines: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.valid == self.records and not (
            self.missing or self.duplicate or self.invalid or self.tampered or self.unknown or self.malformed_lines
        )

    def summary(self) -> str:
        lines = [
            f"records {self.records}, valid {self.valid}, missing {len(self.missing)}, "
            f"duplicate {len(self.duplicate)}, invalid {len(self.invalid)}, tampered {len(self.tampered)}"
            + (f", unknown ids {len(self.unknown)}" if self.unknown else "")
            + (f", malformed lines {len(self.malformed_lines)}" if self.malformed_lines else "")
        ]
        for name in ("missing", "duplicate", "invalid", "tampered", "unknown"):
            ids: list[str] = getattr(self, name)
            if ids:
                more = f" ... and {len(ids) - 20} more" if len(ids) > 20 else ""
                lines.append(f"  {name}: {', '.join(ids[:20])}{more}")
        if self.malformed_lines:
            lines.append(f"  malformed lines: {', '.join(map(str, self.malformed_lines[:20]))}")
        lines.append("OK: every record has exactly one valid signature" if self.ok else "FAILED")
        return "\n".join(lines)


def _load_public_key(path: Path) -> Any:
    try:
        return load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"--pubkey {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"--pubkey {path} is not a PEM public key ({exc})") from None


def run_verify(source: Path, sigs: Path, pubkey: Path) -> VerifyReport:
    """Verify every record of ``source`` against the signature file ``sigs``."""
    check_source(source)
    public_key = _load_public_key(pubkey)
    entries: dict[str, list[dict[str, Any]]] = defaultdict(list)
    report = VerifyReport()
    try:
        with sigs.open("rb") as fh:
            for n, line in enumerate(fh, 1):
                entry = parse_line(line)
                if entry is None:
                    report.malformed_lines.append(n)
                else:
                    entries[entry["id"]].append(entry)
    except OSError as exc:
        raise UsageError(f"--sigs {sigs}: {exc.strerror or exc}") from None
    for record in iter_records(source):
        report.records += 1
        found = entries.pop(record.id, [])
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
            try:
                signature = base64.b64decode(entry["signature"], validate=True)
            except ValueError:
                signature = b""
            if verify_signature(public_key, entry["mechanism"], signature, record.data):
                good += 1
            else:
                report.invalid.append(record.id)
        if good == 1 and len(found) == 1:
            report.valid += 1
    report.unknown = sorted(entries)
    return report
