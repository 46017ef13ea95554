"""The signing key: does it exist, which mechanism fits it, and its fingerprint."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from p11guard._guard import Guard
from p11guard.base import UserError
from p11guard.cli._paths import UsageError
from p11guard.protocol import MECHANISMS, SECRET_TYPES, default_mechanism, mechanisms_for

__all__ = ["key_fingerprint", "pem_fingerprint", "resolve_key"]


def resolve_key(guard: Guard, key: str, mechanism: str | None, digest: bool = False) -> tuple[str, str]:
    """Check the key (a label or a PKCS#11 URI) names a signing key and the mechanism fits
    it (``digest``: one that signs a pre-computed digest); returns (key type, mechanism).

    Whether the *token* offers the mechanism is the token's answer, at the first records."""
    try:
        info = guard.key_info(key)
    except UserError as exc:
        if exc.name != "key_not_found":
            raise UsageError(f"--key {key!r}: {exc.message}") from None
        info = {"classes": []}
    if "private key" not in info["classes"] and "secret key" not in info["classes"]:
        keys = guard.list_keys()
        labels = sorted(k["label"] for k in keys if {"private key", "secret key"} & set(k["classes"]))
        raise UsageError(f"--key {key!r}: no private or secret key with that name; labels: {labels or 'none'}")
    key_type = str(info["type"])
    mech = mechanism or default_mechanism(key_type)
    if mechanism is None and "sign" not in MECHANISMS[mech].uses:
        raise UsageError(f"--key {key!r} is a {key_type} key: it cannot sign")
    if mech not in MECHANISMS or "sign" not in MECHANISMS[mech].uses:
        raise UsageError(f"--mechanism {mech!r}: unknown; known: {', '.join(mechanisms_for('sign'))}")
    if key_type not in MECHANISMS[mech]:
        fits = mechanisms_for("sign", key_type)
        raise UsageError(f"--mechanism {mech!r} does not fit key {key!r} ({key_type}); use one of: {fits}")
    if digest and (MECHANISMS[mech].digest is None or mech.startswith("hmac-")):
        raise UsageError(f"--digest: {mech!r} cannot sign a pre-computed digest; ECDSA and RSA mechanisms can")
    return key_type, mech


def pem_fingerprint(pem: bytes) -> str:
    """Hex SHA-256 of a PEM public key's DER SubjectPublicKeyInfo (``openssl pkey -pubin
    -outform DER | sha256sum``)."""
    der = load_pem_public_key(pem).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def key_fingerprint(guard: Guard, key: str, key_type: str) -> str | None:
    """The fingerprint of ``key``'s public key; ``None`` for a secret key (HMAC), which has
    no public key to name it by."""
    if key_type in SECRET_TYPES or key_type in ("aes", "hmac"):
        return None
    return pem_fingerprint(guard.public_key(key))
