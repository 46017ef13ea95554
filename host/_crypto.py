"""The crypto operations: sign, verify, encrypt, decrypt, digest, random."""

from __future__ import annotations

import os
from typing import Any

import PyKCS11

from p11guard.host._args import BadRequest, Refusal, arg
from p11guard.host._der import DerError, ecdsa_der_to_raw, ecdsa_raw_to_der
from p11guard.host._keys import KeyInfo, Keys
from p11guard.host._session import Session
from p11guard.protocol import MECHANISMS

__all__ = ["Crypto", "sha2"]

_MAX_RANDOM = 1024 * 1024
_DIGESTS = {"sha256": PyKCS11.CKM_SHA256, "sha384": PyKCS11.CKM_SHA384, "sha512": PyKCS11.CKM_SHA512}


def sha2(name: str, data: bytes) -> bytes:
    """SHA-2 of ``data``, when the token lacks the combined mechanism (SoftHSM2: raw ECDSA only).

    CPython's own SHA-2 modules, not :mod:`hashlib`: hashlib loads OpenSSL's libcrypto,
    +3.6 MiB in every host (measured 10.6 -> 14.2 MiB); these cost nothing measurable.
    """
    import importlib

    for module in ("_sha2", "_sha512" if name != "sha256" else "_sha256"):  # 3.12+, then 3.11
        try:
            return bytes(getattr(importlib.import_module(module), name)(data).digest())
        except ImportError:
            continue
    import hashlib

    return hashlib.new(name, data).digest()


class Crypto:
    """Operations on keys found by :class:`Keys`, in the one session of :class:`Session`."""

    def __init__(self, session: Session, keys: Keys) -> None:
        self.session = session
        self.keys = keys

    def _mechanism(self, name: str, key: KeyInfo, data: bytes) -> tuple[Any, bytes, bool]:
        """Returns (PyKCS11 mechanism, data to pass, ECDSA-DER?) for a signing mechanism."""
        kinds = MECHANISMS.get(name)
        if kinds is None:
            raise BadRequest(f"unknown mechanism {name!r} (known: {', '.join(sorted(MECHANISMS))})")
        if key.key_type not in kinds:
            raise Refusal(
                "user",
                "mechanism_mismatch",
                f"mechanism {name!r} does not fit a {key.key_type} key (fits: {', '.join(sorted(kinds))})",
            )
        if name.startswith("ecdsa-"):
            combined = PyKCS11.CKM_ECDSA_SHA256 if name == "ecdsa-sha256" else PyKCS11.CKM_ECDSA_SHA384
            if combined in self.session.mechanisms:
                return PyKCS11.Mechanism(combined), data, True
            return PyKCS11.Mechanism(PyKCS11.CKM_ECDSA), sha2(name[6:], data), True
        if name == "rsa-pkcs1-sha256":
            return PyKCS11.Mechanism(PyKCS11.CKM_SHA256_RSA_PKCS), data, False
        if name == "rsa-pss-sha256":
            mech = PyKCS11.RSA_PSS_Mechanism(
                PyKCS11.CKM_SHA256_RSA_PKCS_PSS, PyKCS11.CKM_SHA256, PyKCS11.CKG_MGF1_SHA256, 32
            )
            return mech, data, False
        if name == "ed25519":
            return PyKCS11.EDDSA_Mechanism(), data, False
        if name == "hmac-sha256":
            return PyKCS11.Mechanism(PyKCS11.CKM_SHA256_HMAC), data, False
        raise BadRequest(f"mechanism {name!r} cannot sign")

    @staticmethod
    def _mechanism_name(args: dict[str, Any], default: str) -> str:
        name: str = arg(args, "mechanism", str, default)
        if name not in MECHANISMS:
            raise BadRequest(f"unknown mechanism {name!r} (known: {', '.join(sorted(MECHANISMS))})")
        return name

    def op_sign(self, args: dict[str, Any]) -> bytes:
        label = arg(args, "key", str)
        data = arg(args, "data", bytes)
        name = self._mechanism_name(args, "ecdsa-sha256")
        cls = PyKCS11.CKO_SECRET_KEY if name == "hmac-sha256" else PyKCS11.CKO_PRIVATE_KEY
        key = self.keys.find(label, cls)
        mech, payload, der = self._mechanism(name, key, data)
        ckm = int(mech.to_native().mechanism)
        fast = self.session.fast
        if fast is not None and name != "rsa-pss-sha256":
            # Two module calls, not three: the buffer is sized from the key, no size query.
            rv, raw = fast.sign(self.session.session_value, ckm, key.value, payload, key.sig_size)
            if rv:
                raise PyKCS11.PyKCS11Error(rv)
            return ecdsa_raw_to_der(raw) if der else raw
        session = self.session.require()
        low, h = session.lib, session.session
        rv = low.C_SignInit(h, mech.to_native(), key.handle)
        if rv != PyKCS11.CKR_OK:
            raise PyKCS11.PyKCS11Error(rv)
        signature = PyKCS11.ckbytelist([0] * key.sig_size)
        rv = low.C_Sign(h, PyKCS11.ckbytelist(payload), signature)
        if rv != PyKCS11.CKR_OK:
            raise PyKCS11.PyKCS11Error(rv)
        raw = bytes(signature)
        return ecdsa_raw_to_der(raw) if der else raw

    def op_verify(self, args: dict[str, Any]) -> bool:
        label = arg(args, "key", str)
        data = arg(args, "data", bytes)
        signature = arg(args, "signature", bytes)
        name = self._mechanism_name(args, "ecdsa-sha256")
        cls = PyKCS11.CKO_SECRET_KEY if name == "hmac-sha256" else PyKCS11.CKO_PUBLIC_KEY
        key = self.keys.find(label, cls)
        mech, payload, der = self._mechanism(name, key, data)
        if der:
            try:
                signature = ecdsa_der_to_raw(signature, key.sig_size)
            except DerError:
                return False
        try:
            return bool(self.session.require().verify(key.handle, payload, signature, mech))
        except PyKCS11.PyKCS11Error as exc:
            if exc.value == PyKCS11.CKR_SIGNATURE_LEN_RANGE:
                return False
            raise

    def _aes_key(self, args: dict[str, Any], verb: str) -> KeyInfo:
        name = arg(args, "mechanism", str, "aes-gcm")
        if name != "aes-gcm":
            raise BadRequest(f"mechanism {name!r} cannot {verb} (known: aes-gcm)")
        key = self.keys.find(arg(args, "key", str), PyKCS11.CKO_SECRET_KEY)
        if key.key_type != "aes-256":
            raise Refusal("user", "mechanism_mismatch", f"aes-gcm does not fit a {key.key_type} key")
        return key

    @staticmethod
    def _gcm(args: dict[str, Any], iv: bytes) -> Any:
        return PyKCS11.AES_GCM_Mechanism(iv, arg(args, "aad", bytes, b""), 128)

    def op_encrypt(self, args: dict[str, Any]) -> bytes:
        data = arg(args, "data", bytes)
        key = self._aes_key(args, "encrypt")
        iv = os.urandom(12)
        return iv + bytes(self.session.require().encrypt(key.handle, data, self._gcm(args, iv)))

    def op_decrypt(self, args: dict[str, Any]) -> bytes:
        data = arg(args, "data", bytes)
        if len(data) < 12 + 16:
            raise Refusal("user", "data_len_range", "aes-gcm data must hold a 12-byte IV and a tag")
        key = self._aes_key(args, "decrypt")
        try:
            return bytes(self.session.require().decrypt(key.handle, data[12:], self._gcm(args, data[:12])))
        except PyKCS11.PyKCS11Error as exc:
            # SoftHSM2 answers a failed GCM tag check with CKR_GENERAL_ERROR.
            if exc.value in (PyKCS11.CKR_GENERAL_ERROR, PyKCS11.CKR_ENCRYPTED_DATA_INVALID):
                raise Refusal(
                    "user",
                    "decrypt_failed",
                    "aes-gcm authentication failed: wrong key or AAD, or the data was altered",
                    ckr=exc.value,
                ) from None
            raise

    def op_digest(self, args: dict[str, Any]) -> bytes:
        data = arg(args, "data", bytes)
        name = arg(args, "mechanism", str, "sha256")
        if name not in _DIGESTS:
            raise BadRequest(f"unknown digest {name!r} (known: {', '.join(_DIGESTS)})")
        return bytes(self.session.require().digest(data, PyKCS11.Mechanism(_DIGESTS[name])))

    def op_random(self, args: dict[str, Any]) -> bytes:
        n = arg(args, "n", int)
        if not 0 < n <= _MAX_RANDOM:
            raise BadRequest(f"argument 'n' must be between 1 and {_MAX_RANDOM}")
        return bytes(self.session.require().generateRandom(n))
