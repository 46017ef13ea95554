"""Keys by label: lookup (cached per session), description, templates, create, destroy, list."""

from __future__ import annotations

import os
from typing import Any

import PyKCS11

from p11guard.host._args import BadRequest, Refusal, arg
from p11guard.host._der import ec_point, spki_pem
from p11guard.host._fastcall import handle_value
from p11guard.host._session import Session

__all__ = ["CLASS_NAMES", "KeyInfo", "Keys"]

# DER of the named-curve OIDs and the Ed25519 OID, as CKA_EC_PARAMS holds them.
_CURVES = {
    "ec-p256": bytes.fromhex("06082a8648ce3d030107"),
    "ec-p384": bytes.fromhex("06052b81040022"),
    "ed25519": bytes.fromhex("06032b6570"),
}
_CURVE_BY_PARAMS = {v: k for k, v in _CURVES.items()}
_SIG_SIZE = {"ec-p256": 64, "ec-p384": 96, "ed25519": 64, "hmac-sha256": 32}
_RSA_BITS = {"rsa-2048": 2048, "rsa-3072": 3072}

CLASS_NAMES = {
    PyKCS11.CKO_PRIVATE_KEY: "private key",
    PyKCS11.CKO_PUBLIC_KEY: "public key",
    PyKCS11.CKO_SECRET_KEY: "secret key",
}


class KeyInfo:
    """A resolved key: its handle (valid in this host's generation only) and its type."""

    __slots__ = ("handle", "key_type", "sig_size", "value")

    def __init__(self, handle: Any, key_type: str, sig_size: int) -> None:
        self.handle = handle
        self.key_type = key_type
        self.sig_size = sig_size
        self.value = handle_value(handle)


def _template(cls: int, label: str, key_id: bytes, *extra: tuple[int, Any]) -> list[tuple[int, Any]]:
    """The attributes every key p11guard makes has: on the token, labelled, with an id;
    private and secret keys are also private, sensitive and never extractable."""
    common = [(PyKCS11.CKA_CLASS, cls), (PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_ID, key_id)]
    if cls != PyKCS11.CKO_PUBLIC_KEY:
        common += [(PyKCS11.CKA_PRIVATE, True), (PyKCS11.CKA_SENSITIVE, True), (PyKCS11.CKA_EXTRACTABLE, False)]
    return common + list(extra)


class Keys:
    """The keys of one session, found by label (never by a handle from outside)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._cache: dict[tuple[str, int], KeyInfo] = {}

    def clear(self) -> None:
        """Forget every handle (a new session)."""
        self._cache.clear()

    def find(self, label: str, cls: int) -> KeyInfo:
        cached = self._cache.get((label, cls))
        if cached is not None:
            return cached
        found = self.session.require().findObjects([(PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_CLASS, cls)])
        if not found:
            labels = sorted({k["label"] for k in self.op_list_keys({})})
            raise Refusal(
                "user",
                "key_not_found",
                f"no {CLASS_NAMES.get(cls, 'key')} labelled {label!r}; labels: {labels or 'none'}",
            )
        info = self.describe(found[0])
        self._cache[(label, cls)] = info
        return info

    def describe(self, handle: Any) -> KeyInfo:
        get = self.session.require().getAttributeValue
        (ktype,) = get(handle, [PyKCS11.CKA_KEY_TYPE])
        if ktype == PyKCS11.CKK_EC:
            params = bytes(get(handle, [PyKCS11.CKA_EC_PARAMS], True)[0])
            name = _CURVE_BY_PARAMS.get(params, "ec")
            return KeyInfo(handle, name, _SIG_SIZE.get(name, 132))
        if ktype == PyKCS11.CKK_EC_EDWARDS:
            return KeyInfo(handle, "ed25519", 64)
        if ktype == PyKCS11.CKK_RSA:
            modulus = get(handle, [PyKCS11.CKA_MODULUS], True)[0]
            size = len(modulus) if modulus else 512
            return KeyInfo(handle, f"rsa-{size * 8}" if size * 8 in _RSA_BITS.values() else "rsa", size)
        if ktype == PyKCS11.CKK_AES:
            return KeyInfo(handle, "aes-256", 0)
        if ktype == PyKCS11.CKK_GENERIC_SECRET:
            return KeyInfo(handle, "hmac-sha256", 32)
        return KeyInfo(handle, f"type-0x{ktype:x}", 512)

    def op_public_key(self, args: dict[str, Any]) -> bytes:
        key = self.find(arg(args, "key", str), PyKCS11.CKO_PUBLIC_KEY)
        get = self.session.require().getAttributeValue
        if key.key_type.startswith("rsa"):
            n, e = get(key.handle, [PyKCS11.CKA_MODULUS, PyKCS11.CKA_PUBLIC_EXPONENT], True)
            return spki_pem(modulus=bytes(n), exponent=bytes(e))
        raw = bytes(get(key.handle, [PyKCS11.CKA_EC_POINT], True)[0])
        if key.key_type == "ed25519":
            return spki_pem(ed25519=ec_point(raw, 32))
        if key.key_type not in _CURVES:
            raise Refusal("user", "key_type_unsupported", f"cannot export a public key of type {key.key_type}")
        return spki_pem(ec_params=_CURVES[key.key_type], point=ec_point(raw, 1 + key.sig_size))

    def _check_new_label(self, label: str) -> None:
        if not label or len(label) > 128:
            raise BadRequest("argument 'label' must be 1 to 128 characters")
        if self.session.require().findObjects([(PyKCS11.CKA_LABEL, label)]):
            raise Refusal("user", "label_exists", f"a key labelled {label!r} already exists")

    def op_generate_key_pair(self, args: dict[str, Any]) -> dict[str, Any]:
        label = arg(args, "label", str)
        ktype = arg(args, "type", str)
        key_id = arg(args, "id", bytes, os.urandom(8))
        pub = _template(PyKCS11.CKO_PUBLIC_KEY, label, key_id, (PyKCS11.CKA_VERIFY, True))
        priv = _template(PyKCS11.CKO_PRIVATE_KEY, label, key_id, (PyKCS11.CKA_SIGN, True))
        if ktype in ("ec-p256", "ec-p384"):
            pub += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC), (PyKCS11.CKA_EC_PARAMS, _CURVES[ktype])]
            priv += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC)]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN)
        elif ktype == "ed25519":
            pub += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC_EDWARDS), (PyKCS11.CKA_EC_PARAMS, _CURVES[ktype])]
            priv += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC_EDWARDS)]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_EC_EDWARDS_KEY_PAIR_GEN)
        elif ktype in _RSA_BITS:
            pub += [
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_RSA),
                (PyKCS11.CKA_MODULUS_BITS, _RSA_BITS[ktype]),
                (PyKCS11.CKA_PUBLIC_EXPONENT, (0x01, 0x00, 0x01)),
                (PyKCS11.CKA_ENCRYPT, True),
            ]
            priv += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_RSA), (PyKCS11.CKA_DECRYPT, True)]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_RSA_PKCS_KEY_PAIR_GEN)
        else:
            raise BadRequest(f"unknown key pair type {ktype!r} (known: ec-p256, ec-p384, rsa-2048, rsa-3072, ed25519)")
        self._check_new_label(label)
        self.session.require().generateKeyPair(pub, priv, mech)
        return {"label": label, "type": ktype, "id": key_id.hex()}

    def op_generate_secret(self, args: dict[str, Any]) -> dict[str, Any]:
        label = arg(args, "label", str)
        ktype = arg(args, "type", str)
        key_id = arg(args, "id", bytes, os.urandom(8))
        if ktype == "aes-256":
            extra = [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES), (PyKCS11.CKA_ENCRYPT, True), (PyKCS11.CKA_DECRYPT, True)]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_GEN)
        elif ktype == "hmac-sha256":
            extra = [
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_GENERIC_SECRET),
                (PyKCS11.CKA_SIGN, True),
                (PyKCS11.CKA_VERIFY, True),
            ]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_GENERIC_SECRET_KEY_GEN)
        else:
            raise BadRequest(f"unknown secret type {ktype!r} (known: aes-256, hmac-sha256)")
        template = _template(PyKCS11.CKO_SECRET_KEY, label, key_id, (PyKCS11.CKA_VALUE_LEN, 32), *extra)
        self._check_new_label(label)
        self.session.require().generateKey(template, mech)
        return {"label": label, "type": ktype, "id": key_id.hex()}

    def op_destroy(self, args: dict[str, Any]) -> int:
        label = arg(args, "label", str)
        session = self.session.require()
        found = session.findObjects([(PyKCS11.CKA_LABEL, label)])
        for handle in found:
            session.destroyObject(handle)
        self._cache = {k: v for k, v in self._cache.items() if k[0] != label}
        return len(found)

    def op_list_keys(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        session = self.session.require()
        keys: dict[str, dict[str, Any]] = {}
        for handle in session.findObjects([]):
            cls_i, name = session.getAttributeValue(handle, [PyKCS11.CKA_CLASS, PyKCS11.CKA_LABEL])
            if cls_i not in CLASS_NAMES:
                continue
            key_id = session.getAttributeValue(handle, [PyKCS11.CKA_ID], True)[0]
            name = str(name)
            entry = keys.setdefault(name, {"label": name, "type": "", "classes": [], "id": ""})
            entry["classes"].append(CLASS_NAMES[cls_i])
            entry["id"] = bytes(key_id).hex() if key_id else ""
            if not entry["type"] or cls_i == PyKCS11.CKO_PUBLIC_KEY:
                entry["type"] = self.describe(handle).key_type
        return sorted(keys.values(), key=lambda k: str(k["label"]))
