"""The CPU work of ``p11guard verify``: check (record, signature lines) tasks, in any process.

A task is a record's bytes (``None``: it could not be read) and the raw signature lines in
force for it. Each line gets one code: it is not a signature entry (:data:`MALFORMED`), its
record could not be read (:data:`UNREAD`), or the record's SHA-256 differs (:data:`TAMPERED`),
its ``key_sha256`` is not the public key's (:data:`WRONG_KEY`), the signature is good
(:data:`GOOD`) or not (:data:`INVALID`). Pure: the same tasks give the same codes in any
process, in any order. A pool process loads the key once (:func:`init`).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from p11guard.cli._records import parse_digest, parse_entry
from p11guard.protocol import DIGEST_SIZES, MECHANISMS

__all__ = [
    "GOOD",
    "INVALID",
    "MALFORMED",
    "TAMPERED",
    "UNREAD",
    "WRONG_KEY",
    "Task",
    "check_chunk",
    "check_tasks",
    "init",
    "verify_signature",
]

GOOD, TAMPERED, WRONG_KEY, INVALID, MALFORMED, UNREAD = range(6)
#: A record's bytes (or ``None``) and its signature lines in force.
Task = tuple[bytes | None, tuple[bytes, ...]]

_KEY: tuple[Any, str] | None = None  # this process's public key and its fingerprint


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


def _signed(entry: dict[str, Any], data: bytes) -> bytes:
    """What the HSM signed for a record: the record, or with ``"input": "digest"`` the
    digest the record holds in hex (``b""`` if it holds none: the signature is invalid)."""
    if entry.get("input") != "digest":
        return data
    spec = MECHANISMS.get(entry["mechanism"])
    size = DIGEST_SIZES.get(str(spec.digest if spec is not None else None), 0)
    return parse_digest(data, size) or b""


def init(pem: bytes, fingerprint: str) -> None:
    """Load the public key in this process (a pool's initializer)."""
    global _KEY
    _KEY = (load_pem_public_key(pem), fingerprint)


def check_tasks(tasks: list[Task], public_key: Any, fingerprint: str) -> list[tuple[int, ...]]:
    """The codes of each task's lines (see the module)."""
    out: list[tuple[int, ...]] = []
    for data, lines in tasks:
        digest: str | None = None
        codes = []
        for line in lines:
            entry, _ = parse_entry(line)
            if entry is None:
                codes.append(MALFORMED)
                continue
            if data is None:
                codes.append(UNREAD)
                continue
            if digest is None:
                digest = hashlib.sha256(data).hexdigest()
            if entry["sha256"] != digest:
                codes.append(TAMPERED)
            elif entry.get("key_sha256", fingerprint) != fingerprint:
                codes.append(WRONG_KEY)
            else:
                signature = base64.b64decode(entry["signature"], validate=True)
                digest_input = entry.get("input") == "digest"
                good = verify_signature(public_key, entry["mechanism"], signature, _signed(entry, data), digest_input)
                codes.append(GOOD if good else INVALID)
        out.append(tuple(codes))
    return out


def check_chunk(tasks: list[Task]) -> list[tuple[int, ...]]:
    """:func:`check_tasks` with the key :func:`init` loaded (in a pool process)."""
    if _KEY is None:
        raise RuntimeError("p11guard verify worker: init() was not called")
    return check_tasks(tasks, *_KEY)
