"""The signing key: does it exist, which mechanism fits it, and its fingerprint."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from p11guard._guard import Guard
from p11guard.cli._paths import UsageError
from p11guard.protocol import MECHANISMS, SECRET_TYPES, default_mechanism

__all__ = ["key_fingerprint", "pem_fingerprint", "resolve_key"]


def resolve_key(guard: Guard, key: str, mechanism: str | None) -> tuple[str, str]:
    """Check the key exists and the mechanism fits it; returns (key type, mechanism)."""
    keys = {k["label"]: k for k in guard.list_keys()}
    if key not in keys or "private key" not in keys[key]["classes"]:
        labels = sorted(label for label, k in keys.items() if "private key" in k["classes"])
        raise UsageError(f"--key {key!r}: no private key with that label; labels: {labels or 'none'}")
    key_type = str(keys[key]["type"])
    mech = mechanism or default_mechanism(key_type)
    if mech not in MECHANISMS:
        raise UsageError(f"--mechanism {mech!r}: unknown; known: {', '.join(sorted(MECHANISMS))}")
    if key_type not in MECHANISMS[mech]:
        fits = sorted(m for m, types in MECHANISMS.items() if key_type in types)
        raise UsageError(f"--mechanism {mech!r} does not fit key {key!r} ({key_type}); use one of: {fits}")
    return key_type, mech


def pem_fingerprint(pem: bytes) -> str:
    """Hex SHA-256 of a PEM public key's DER SubjectPublicKeyInfo (``openssl pkey -pubin
    -outform DER | sha256sum``)."""
    der = load_pem_public_key(pem).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def key_fingerprint(guard: Guard, key: str, key_type: str) -> str | None:
    """The fingerprint of ``key``'s public key; ``None`` for a secret key (HMAC), which has
    no public key to name it by."""
    if key_type in SECRET_TYPES:
        return None
    return pem_fingerprint(guard.public_key(key))
