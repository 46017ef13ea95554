"""The little DER the host needs: ECDSA signatures and SubjectPublicKeyInfo.

PKCS#11 signs ECDSA as ``r || s``; X.509, CMS and openssl want DER. ``cryptography``'s
``encode_dss_signature`` does the same, but importing it costs every host ~6 MiB of RSS
and ~25 ms of start-up (measured: 15.2 -> 21.2 MiB), more than these forty lines cost.
Imports nothing of ours.
"""

from __future__ import annotations

import base64

__all__ = [
    "DerError",
    "digest_info",
    "ec_point",
    "ecdsa_der_to_raw",
    "ecdsa_raw_to_der",
    "spki_der",
    "spki_ec_point",
    "spki_pem",
]

_EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")  # OID 1.2.840.10045.2.1
_RSA_ENCRYPTION = bytes.fromhex("06092a864886f70d010101") + b"\x05\x00"  # OID + NULL
_ED25519 = bytes.fromhex("06032b6570")  # OID 1.3.101.112
#: DER ``DigestInfo`` up to the digest (RFC 8017 9.2 note 1): what CKM_RSA_PKCS signs before it.
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


class DerError(ValueError):
    """The bytes are not the DER that was expected."""


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _len(len(value)) + value


def _int(value: bytes) -> bytes:
    value = value.lstrip(b"\x00") or b"\x00"
    if value[0] & 0x80:
        value = b"\x00" + value
    return _tlv(0x02, value)


def ecdsa_raw_to_der(raw: bytes) -> bytes:
    """PKCS#11's ``r || s`` to the DER ``SEQUENCE { r, s }``."""
    half = len(raw) // 2
    return _tlv(0x30, _int(raw[:half]) + _int(raw[half:]))


def _read(buf: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    """One DER TLV of ``tag`` at ``pos``: (value, position after it)."""
    if pos + 2 > len(buf) or buf[pos] != tag:
        raise DerError(f"expected DER tag 0x{tag:02x} at byte {pos}")
    n = buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    if pos + n > len(buf):
        raise DerError("DER value is truncated")
    return buf[pos : pos + n], pos + n


def ecdsa_der_to_raw(der: bytes, size: int) -> bytes:
    """The inverse of :func:`ecdsa_raw_to_der`; ``size`` is the length of ``r || s``."""
    half = size // 2
    seq, _ = _read(der, 0, 0x30)
    r, pos = _read(seq, 0, 0x02)
    s, _ = _read(seq, pos, 0x02)
    r, s = r.lstrip(b"\x00"), s.lstrip(b"\x00")
    if len(r) > half or len(s) > half:
        raise DerError("ECDSA signature does not fit the curve")
    return r.rjust(half, b"\x00") + s.rjust(half, b"\x00")


def _spki(algorithm: bytes, key: bytes) -> bytes:
    return _tlv(0x30, _tlv(0x30, algorithm) + _tlv(0x03, b"\x00" + key))


def spki_der(
    *,
    ec_params: bytes | None = None,
    point: bytes | None = None,
    ed25519: bytes | None = None,
    modulus: bytes | None = None,
    exponent: bytes | None = None,
) -> bytes:
    """A public key as DER ``SubjectPublicKeyInfo``: EC (curve OID + point), Ed25519, or RSA."""
    if ed25519 is not None:
        return _spki(_ED25519, ed25519)
    if ec_params is not None and point is not None:
        return _spki(_EC_PUBLIC_KEY + ec_params, point)
    if modulus is not None and exponent is not None:
        return _spki(_RSA_ENCRYPTION, _tlv(0x30, _int(modulus) + _int(exponent)))
    raise DerError("a public key needs an EC point and curve, an Ed25519 key, or an RSA modulus and exponent")


def spki_pem(der: bytes) -> bytes:
    """PEM of a DER ``SubjectPublicKeyInfo``."""
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN PUBLIC KEY-----\n" + b"\n".join(lines) + b"\n-----END PUBLIC KEY-----\n"


def ec_point(value: bytes, size: int) -> bytes:
    """The bare point of ``size`` bytes from ``CKA_EC_POINT``: a DER OCTET STRING for most
    modules, the bare point for some (the size tells them apart: 04 starts both)."""
    if len(value) == size:
        return value
    point, end = _read(value, 0, 0x04)
    if end != len(value) or len(point) != size:
        raise DerError(f"CKA_EC_POINT of {len(value)} bytes is not a point of {size} bytes")
    return point


def digest_info(name: str, digest: bytes) -> bytes:
    """The DER ``DigestInfo`` of a SHA-2 ``digest``: PKCS#1 v1.5 signs this with a raw RSA key."""
    return _DIGEST_INFO[name] + digest


def spki_ec_point(data: bytes) -> tuple[bytes, bytes]:
    """(curve OID as DER, uncompressed point) of an EC public key given as PEM, as DER
    SubjectPublicKeyInfo, or as the bare point (curve OID then ``b""``)."""
    if data.startswith(b"-----BEGIN"):
        body = b"".join(line for line in data.splitlines() if line and not line.startswith(b"-----"))
        try:
            data = base64.b64decode(body, validate=True)
        except ValueError:
            raise DerError("the PEM public key is not base64") from None
    if data[:1] == b"\x04":
        return b"", data
    spki, _ = _read(data, 0, 0x30)
    algorithm, pos = _read(spki, 0, 0x30)
    bits, _ = _read(spki, pos, 0x03)
    oid, after = _read(algorithm, 0, 0x06)
    if _tlv(0x06, oid) != _EC_PUBLIC_KEY or algorithm[after : after + 1] != b"\x06":
        raise DerError("the public key is not an EC key on a named curve")
    curve, _ = _read(algorithm, after, 0x06)
    if bits[:1] != b"\x00" or bits[1:2] != b"\x04":
        raise DerError("the EC public key is not an uncompressed point")
    return _tlv(0x06, curve), bits[1:]
