"""Encryption and keys from keys: encrypt/decrypt (AES-GCM, AES-CBC-PAD, RSA-OAEP), wrap/unwrap
(AES key wrap with padding, RSA-OAEP), derive (ECDH into a secret key on the token)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import PyKCS11

from p11guard.host._args import BadRequest, Refusal, arg
from p11guard.host._der import DerError, spki_ec_point
from p11guard.host._keygen import KeyMaker, secret_template
from p11guard.host._keys import CURVES, KeyInfo, Keys
from p11guard.host._session import Session
from p11guard.protocol import MECHANISMS, mechanisms_for

__all__ = ["Cipher"]

T = TypeVar("T")

_IV = {"aes-gcm": 12, "aes-cbc-pad": 16}
_TAG = 16
#: What a failed authentication (GCM tag) or padding check answers.
_DECRYPT_FAILED = {PyKCS11.CKR_ENCRYPTED_DATA_INVALID, PyKCS11.CKR_ENCRYPTED_DATA_LEN_RANGE}


def _oaep() -> Any:
    return PyKCS11.RSAOAEPMechanism(PyKCS11.CKM_SHA256, PyKCS11.CKG_MGF1_SHA256)


class Cipher:
    """Operations that encrypt, or make a key from another (both need a negotiated mechanism)."""

    def __init__(self, session: Session, keys: Keys, maker: KeyMaker) -> None:
        self.session = session
        self.keys = keys
        self.maker = maker

    def _name(self, args: dict[str, Any], use: str, default: str) -> str:
        name: str = arg(args, "mechanism", str, default)
        if name not in MECHANISMS or use not in MECHANISMS[name].uses:
            raise BadRequest(f"mechanism {name!r} cannot {use} (known: {', '.join(mechanisms_for(use))})")
        self.session.negotiated.plan(name, use)  # a mechanism the token lacks: refused, named
        return name

    def _call(self, name: str, use: str, call: Callable[[], T], learn: bool = True) -> T:
        """``call``; a token that refuses the mechanism (or, ``learn``-ing, its parameters)
        although it listed it: the session's table learns it, and the refusal names the
        token and what it offers instead."""
        negotiated = self.session.negotiated
        plan = negotiated.plan(name, use)
        try:
            return call()
        except PyKCS11.PyKCS11Error as exc:
            if negotiated.refused(plan, exc.value, learn):
                negotiated.plan(name, use)  # raises: nothing else does it
            raise

    def _key(self, name: str, text: str, cls: int) -> KeyInfo:
        key = self.keys.find(text, cls)
        if key.key_type not in MECHANISMS[name]:
            fits = ", ".join(sorted(MECHANISMS[name]))
            raise Refusal("user", "mechanism_mismatch", f"{name} does not fit a {key.key_type} key (fits: {fits})")
        return key

    @staticmethod
    def _mechanism(name: str, args: dict[str, Any], iv: bytes) -> Any:
        aad = arg(args, "aad", bytes, b"")
        if name == "aes-gcm":
            return PyKCS11.AES_GCM_Mechanism(iv, aad, _TAG * 8)
        if aad:
            raise BadRequest(f"{name} takes no 'aad' (only aes-gcm authenticates extra data)")
        if name == "aes-cbc-pad":
            return PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC_PAD, iv)
        return _oaep()

    def op_encrypt(self, args: dict[str, Any]) -> bytes:
        """AES-GCM: IV (12 bytes) + ciphertext + tag; AES-CBC-PAD: IV (16) + ciphertext;
        RSA-OAEP (SHA-256, with the public key): the ciphertext."""
        data = arg(args, "data", bytes)
        name = self._name(args, "encrypt", "aes-gcm")
        rsa = name.startswith("rsa-")
        key = self._key(name, arg(args, "key", str), PyKCS11.CKO_PUBLIC_KEY if rsa else PyKCS11.CKO_SECRET_KEY)
        iv = os.urandom(_IV.get(name, 0))
        mech = self._mechanism(name, args, iv)
        return iv + bytes(self._call(name, "encrypt", lambda: self.session.require().encrypt(key.handle, data, mech)))

    def op_decrypt(self, args: dict[str, Any]) -> bytes:
        data = arg(args, "data", bytes)
        name = self._name(args, "encrypt", "aes-gcm")
        rsa = name.startswith("rsa-")
        n = _IV.get(name, 0)
        if len(data) < n + (_TAG if name == "aes-gcm" else 1):
            raise Refusal("user", "data_len_range", f"{name} data must hold a {n}-byte IV and the ciphertext")
        key = self._key(name, arg(args, "key", str), PyKCS11.CKO_PRIVATE_KEY if rsa else PyKCS11.CKO_SECRET_KEY)
        mech = self._mechanism(name, args, data[:n])
        try:
            return bytes(
                self._call(name, "encrypt", lambda: self.session.require().decrypt(key.handle, data[n:], mech), False)
            )
        except PyKCS11.PyKCS11Error as exc:
            # SoftHSM2 answers a GCM tag that does not match with CKR_GENERAL_ERROR.
            if exc.value in _DECRYPT_FAILED or (name == "aes-gcm" and exc.value == PyKCS11.CKR_GENERAL_ERROR):
                raise Refusal(
                    "user",
                    "decrypt_failed",
                    f"{name} decryption failed: wrong key"
                    + (" or AAD" if name == "aes-gcm" else "")
                    + ", or the data was altered",
                    ckr=exc.value,
                ) from None
            raise

    # -- keys from keys ------------------------------------------------------------------

    def _wrap_mechanism(self, name: str) -> Any:
        return _oaep() if name == "rsa-oaep-sha256" else PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_WRAP_PAD)

    def op_wrap(self, args: dict[str, Any]) -> bytes:
        """The secret key ``target`` (made extractable), wrapped under ``key``."""
        name = self._name(args, "wrap", "aes-key-wrap-pad")
        rsa = name.startswith("rsa-")
        key = self._key(name, arg(args, "key", str), PyKCS11.CKO_PUBLIC_KEY if rsa else PyKCS11.CKO_SECRET_KEY)
        target = self.keys.find(arg(args, "target", str), PyKCS11.CKO_SECRET_KEY)
        mech = self._wrap_mechanism(name)
        return bytes(self._call(name, "wrap", lambda: self.session.require().wrapKey(key.handle, target.handle, mech)))

    def op_unwrap(self, args: dict[str, Any]) -> dict[str, Any]:
        """A secret key labelled ``label`` of ``type`` on the token, from ``wrapped`` under ``key``."""
        name = self._name(args, "wrap", "aes-key-wrap-pad")
        wrapped, label, ktype = arg(args, "wrapped", bytes), arg(args, "label", str), arg(args, "type", str)
        rsa = name.startswith("rsa-")
        key = self._key(name, arg(args, "key", str), PyKCS11.CKO_PRIVATE_KEY if rsa else PyKCS11.CKO_SECRET_KEY)
        key_id = arg(args, "id", bytes, os.urandom(8))
        template = secret_template(label, key_id, ktype, arg(args, "extractable", bool, False), sized=False)
        session = self.session.require()
        mech = self._wrap_mechanism(name)

        def make() -> list[Any]:
            handle = session.unwrapKey(key.handle, wrapped, template, mech)
            got = self.keys.describe(handle).key_type
            if got != ktype and got not in ("aes", "hmac"):  # those: a token that does not say the length
                session.destroyObject(handle)
                raise Refusal("user", "unwrap_type_mismatch", f"the wrapped key is a {got} key, not {ktype}")
            return [handle]

        self._call(name, "wrap", lambda: self.maker.create(label, PyKCS11.CKO_SECRET_KEY, key_id, make), False)
        return self.maker.made(label, key_id)

    def op_derive(self, args: dict[str, Any]) -> dict[str, Any]:
        """ECDH of the private key ``key`` with ``peer`` (PEM, DER SPKI or the point) into a
        secret key labelled ``label`` of ``type`` (CKD_NULL: no KDF; the token cuts the shared
        secret to the key's length -- SoftHSM2 keeps its trailing bytes)."""
        name = self._name(args, "derive", "ecdh")
        label, ktype = arg(args, "label", str), arg(args, "type", str, "aes-256")
        key = self._key(name, arg(args, "key", str), PyKCS11.CKO_PRIVATE_KEY)
        try:
            curve, point = spki_ec_point(arg(args, "peer", bytes))
        except (DerError, IndexError) as exc:
            raise BadRequest(f"argument 'peer' is not an EC public key (PEM, DER or a point): {exc}") from None
        if curve and curve != CURVES.get(key.key_type):
            raise Refusal("user", "curve_mismatch", f"the peer's public key is not on the {key.key_type} curve")
        key_id = arg(args, "id", bytes, os.urandom(8))
        template = secret_template(label, key_id, ktype, arg(args, "extractable", bool, False))
        session = self.session.require()
        mech = PyKCS11.ECDH1_DERIVE_Mechanism(point)
        self._call(
            name,
            "derive",
            lambda: self.maker.create(
                label, PyKCS11.CKO_SECRET_KEY, key_id, lambda: [session.deriveKey(key.handle, template, mech)]
            ),
        )
        return self.maker.made(label, key_id)
