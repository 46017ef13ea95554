"""Operation and mechanism names shared by the host and its callers."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "DIGEST_SIZES",
    "IDEMPOTENT_OPS",
    "KEY_OPS",
    "KEY_TYPES",
    "MECHANISMS",
    "OPS",
    "SECRET_TYPES",
    "TOKEN_CHANGING_OPS",
    "MechanismSpec",
    "default_mechanism",
    "mechanisms_for",
]

#: Operations that can be repeated without changing the token: retried after a loss.
IDEMPOTENT_OPS = frozenset(
    {
        "sign",
        "sign_digest",
        "verify",
        "encrypt",
        "decrypt",
        "wrap",
        "digest",
        "random",
        "public_key",
        "list_keys",
        "key_fingerprint",
        "key_info",
        "mechanisms",
    }
)
#: Operations that change the token: never retried blindly (``OutcomeUnknown``).
TOKEN_CHANGING_OPS = frozenset({"generate_key_pair", "generate_secret", "destroy", "unwrap", "derive"})
#: Operations that use a key named by ``args["key"]`` (checked against the guard's pins).
KEY_OPS = frozenset(
    {"sign", "sign_digest", "verify", "encrypt", "decrypt", "public_key", "wrap", "unwrap", "derive", "key_info"}
)
#: Control operations, handled by the host itself.
CONTROL_OPS = frozenset({"open", "probe", "close", "batch", "fault", "ping"})
OPS = IDEMPOTENT_OPS | TOKEN_CHANGING_OPS | CONTROL_OPS

#: Bytes of each digest a mechanism may hash with.
DIGEST_SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}


class MechanismSpec(frozenset[str]):
    """The key types a mechanism fits (it *is* that set), with what it is for.

    Attributes:
        uses: ``sign`` (and verify), ``encrypt`` (and decrypt), ``wrap`` (and unwrap), ``derive``.
        digest: the hash a signing mechanism uses (``sha256``...), or ``None``.
    """

    uses: frozenset[str]
    digest: str | None

    def __new__(cls, key_types: Iterable[str], uses: Iterable[str], digest: str | None = None) -> MechanismSpec:
        spec = super().__new__(cls, key_types)
        spec.uses = frozenset(uses)
        spec.digest = digest
        return spec

    def __reduce__(self) -> tuple[object, ...]:
        return (MechanismSpec, (set(self), set(self.uses), self.digest))


_EC = ("ec-p256", "ec-p384", "ec-p521")
_RSA = ("rsa-2048", "rsa-3072", "rsa-4096", "rsa")
_HMAC = ("hmac-sha256", "hmac-sha384", "hmac-sha512")
_AES = ("aes-128", "aes-192", "aes-256", "aes")  # "aes": a token that does not say its length


def _signing() -> dict[str, MechanismSpec]:
    out: dict[str, MechanismSpec] = {}
    for digest in DIGEST_SIZES:
        out[f"ecdsa-{digest}"] = MechanismSpec(_EC, {"sign"}, digest)
    for digest in DIGEST_SIZES:
        out[f"rsa-pkcs1-{digest}"] = MechanismSpec(_RSA, {"sign"}, digest)
    for digest in DIGEST_SIZES:
        out[f"rsa-pss-{digest}"] = MechanismSpec(_RSA, {"sign"}, digest)
    out["ed25519"] = MechanismSpec({"ed25519"}, {"sign"})
    for i, digest in enumerate(DIGEST_SIZES):
        # An HMAC key of at least the digest's size (a token may refuse shorter ones).
        out[f"hmac-{digest}"] = MechanismSpec((*_HMAC[i:], "hmac"), {"sign"})
    return out


#: THE table of mechanism names: name -> the key types it fits (a :class:`MechanismSpec`).
MECHANISMS: dict[str, MechanismSpec] = {
    **_signing(),
    "aes-gcm": MechanismSpec(_AES, {"encrypt"}),
    "aes-cbc-pad": MechanismSpec(_AES, {"encrypt"}),
    "rsa-oaep-sha256": MechanismSpec(_RSA, {"encrypt", "wrap"}),
    "aes-key-wrap-pad": MechanismSpec(_AES, {"wrap"}),
    "ecdh": MechanismSpec(("ec-p256", "ec-p384", "ec-p521"), {"derive"}),
}
KEY_TYPES = ("ec-p256", "ec-p384", "ec-p521", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")
SECRET_TYPES = ("aes-128", "aes-192", "aes-256", "hmac-sha256", "hmac-sha384", "hmac-sha512")


def mechanisms_for(use: str, key_type: str | None = None) -> list[str]:
    """The names of the mechanisms for ``use`` (and fitting ``key_type``), in table order."""
    return [n for n, s in MECHANISMS.items() if use in s.uses and (key_type is None or key_type in s)]


def default_mechanism(key_type: str) -> str:
    """The signing mechanism to use for a key type when the caller names none."""
    if key_type.startswith("ec-"):
        return {"ec-p256": "ecdsa-sha256", "ec-p384": "ecdsa-sha384"}.get(key_type, "ecdsa-sha512")
    if key_type.startswith("rsa"):
        return "rsa-pkcs1-sha256"
    if key_type == "ed25519":
        return "ed25519"
    if key_type.startswith("hmac"):
        return "hmac-sha256" if key_type == "hmac" else key_type
    if key_type.startswith("aes-"):
        return "aes-gcm"
    raise ValueError(f"no default mechanism for key type {key_type!r}")
