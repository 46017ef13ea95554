"""Operation and mechanism names shared by the host and its callers."""

from __future__ import annotations

__all__ = [
    "IDEMPOTENT_OPS",
    "KEY_OPS",
    "KEY_TYPES",
    "MECHANISMS",
    "OPS",
    "SECRET_TYPES",
    "TOKEN_CHANGING_OPS",
    "default_mechanism",
]

#: Operations that can be repeated without changing the token: retried after a loss.
IDEMPOTENT_OPS = frozenset(
    {"sign", "verify", "encrypt", "decrypt", "digest", "random", "public_key", "list_keys", "key_fingerprint"}
)
#: Operations that change the token: never retried blindly (``OutcomeUnknown``).
TOKEN_CHANGING_OPS = frozenset({"generate_key_pair", "generate_secret", "destroy"})
#: Operations that use a key named by ``args["key"]`` (checked against the guard's pins).
KEY_OPS = frozenset({"sign", "verify", "encrypt", "decrypt", "public_key"})
#: Control operations, handled by the host itself.
CONTROL_OPS = frozenset({"open", "probe", "close", "batch", "fault", "ping"})
OPS = IDEMPOTENT_OPS | TOKEN_CHANGING_OPS | CONTROL_OPS

#: Mechanism name -> the key types it works with.
MECHANISMS: dict[str, frozenset[str]] = {
    "ecdsa-sha256": frozenset({"ec-p256", "ec-p384"}),
    "ecdsa-sha384": frozenset({"ec-p256", "ec-p384"}),
    "rsa-pkcs1-sha256": frozenset({"rsa-2048", "rsa-3072", "rsa"}),
    "rsa-pss-sha256": frozenset({"rsa-2048", "rsa-3072", "rsa"}),
    "ed25519": frozenset({"ed25519"}),
    "hmac-sha256": frozenset({"hmac-sha256"}),
    "aes-gcm": frozenset({"aes-256"}),
}
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "ed25519")
SECRET_TYPES = ("aes-256", "hmac-sha256")


def default_mechanism(key_type: str) -> str:
    """The signing mechanism to use for a key type when the caller names none."""
    if key_type.startswith("ec-"):
        return "ecdsa-sha256" if key_type == "ec-p256" else "ecdsa-sha384"
    if key_type.startswith("rsa"):
        return "rsa-pkcs1-sha256"
    if key_type == "ed25519":
        return "ed25519"
    if key_type == "hmac-sha256":
        return "hmac-sha256"
    if key_type == "aes-256":
        return "aes-gcm"
    raise ValueError(f"no default mechanism for key type {key_type!r}")
