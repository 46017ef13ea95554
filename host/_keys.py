"""Keys by name (a label or a PKCS#11 URI): lookup (cached per session), description,
public keys, fingerprints, listing, destroy. Making keys is :mod:`._keygen`."""

from __future__ import annotations

from typing import Any

import PyKCS11

from p11guard.host._args import Refusal, arg
from p11guard.host._ckr import ckr_kind
from p11guard.host._der import ec_point, spki_der, spki_pem
from p11guard.host._fastcall import handle_value
from p11guard.host._keyref import KeyRef, check_token, parse_key_ref
from p11guard.host._session import Session

__all__ = ["CLASS_NAMES", "CURVES", "KeyInfo", "Keys", "sha256_hex"]

# DER of the named-curve OIDs and the Ed25519 OID, as CKA_EC_PARAMS holds them.
CURVES = {
    "ec-p256": bytes.fromhex("06082a8648ce3d030107"),
    "ec-p384": bytes.fromhex("06052b81040022"),
    "ec-p521": bytes.fromhex("06052b81040023"),
    "ed25519": bytes.fromhex("06032b6570"),
}
_CURVE_BY_PARAMS = {v: k for k, v in CURVES.items()}
#: Bytes of an ECDSA signature ``r || s`` (and of the curve's field, twice).
_EC_SIG = {"ec-p256": 64, "ec-p384": 96, "ec-p521": 132, "ed25519": 64}
_EC_BITS = {"ec-p256": 256, "ec-p384": 384, "ec-p521": 521, "ed25519": 256}
_RSA_TYPES = (2048, 3072, 4096)
_AES_TYPES = {16: "aes-128", 24: "aes-192", 32: "aes-256"}
_HMAC_TYPES = {32: "hmac-sha256", 48: "hmac-sha384", 64: "hmac-sha512"}

CLASS_NAMES = {
    PyKCS11.CKO_PRIVATE_KEY: "private key",
    PyKCS11.CKO_PUBLIC_KEY: "public key",
    PyKCS11.CKO_SECRET_KEY: "secret key",
}


def sha256_hex(data: bytes) -> str:
    from p11guard.host._crypto import sha2

    return sha2("sha256", data).hex()


class KeyInfo:
    """A resolved key: its handle (valid in this host's generation only), type and sizes."""

    __slots__ = ("bits", "handle", "key_type", "sig_size", "value")

    def __init__(self, handle: Any, key_type: str, sig_size: int, bits: int = 0) -> None:
        self.handle = handle
        self.key_type = key_type
        self.sig_size = sig_size
        self.bits = bits  #: RSA modulus or EC curve bits, as tokens give key sizes (0: another key)
        self.value = handle_value(handle)


class Keys:
    """The keys of one session, found by name (never by a handle from outside)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._cache: dict[tuple[str, int], KeyInfo] = {}

    def clear(self) -> None:
        """Forget every handle (a new session)."""
        self._cache.clear()

    def forget(self, label: str) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k[0] != label and not k[0].startswith("pkcs11:")}

    def ref(self, text: str) -> KeyRef:
        """Parse a key name, and check a URI's token attributes against this token."""
        ref = parse_key_ref(text)
        if ref.token:
            check_token(ref, self.session.token_info)
        return ref

    def find(self, name: str, cls: int) -> KeyInfo:
        """The key of class ``cls`` named ``name`` (a label or a PKCS#11 URI; a URI's
        ``type`` says which object it points at: an operation takes the object of the class
        it needs with the same label and id)."""
        cached = self._cache.get((name, cls))
        if cached is not None:
            return cached
        ref = self.ref(name)
        found = self.objects(ref, cls)
        if not found:
            what = f"labelled {ref.label!r}" if ref.key_id is None and ref.label == name else f"matching {name!r}"
            others = [CLASS_NAMES[c] for c in CLASS_NAMES if c != cls and self.objects(ref, c)]
            if others:
                where = f" (it names a {', '.join(others)}: the mechanism needs a {CLASS_NAMES.get(cls, 'key')})"
            else:
                where = f"; labels: {sorted({k['label'] for k in self.op_list_keys({})}) or 'none'}"
            raise Refusal("user", "key_not_found", f"no {CLASS_NAMES.get(cls, 'key')} {what}{where}")
        info = self.describe(found[0])
        self._cache[(name, cls)] = info
        return info

    def objects(self, ref: KeyRef, cls: int) -> list[Any]:
        """The objects of class ``cls`` that ``ref`` names: one at most, or a refusal that
        names them -- a name that fits two keys would pair a signature with the wrong one."""
        session = self.session.require()
        template: list[tuple[int, Any]] = [(PyKCS11.CKA_CLASS, cls)]
        if ref.label is not None:
            template.append((PyKCS11.CKA_LABEL, ref.label))
        if ref.key_id is not None:
            template.append((PyKCS11.CKA_ID, ref.key_id))
        found = list(session.findObjects(template))
        if len(found) > 1:
            ids = sorted(bytes(session.getAttributeValue(h, [PyKCS11.CKA_ID], True)[0]).hex() or "none" for h in found)
            what = f"label {ref.label!r}" if ref.label == ref.text else f"key URI {ref.text!r}"
            raise Refusal(
                "user",
                "label_ambiguous",
                f"{what} names {len(found)} {CLASS_NAMES.get(cls, 'object')}s (CKA_ID {', '.join(ids)}); "
                "one label must name one key: destroy the extra ones or give them their own labels",
            )
        return found

    def describe(self, handle: Any) -> KeyInfo:
        get = self.session.require().getAttributeValue
        (ktype,) = get(handle, [PyKCS11.CKA_KEY_TYPE])
        if ktype == PyKCS11.CKK_EC:
            params = bytes(get(handle, [PyKCS11.CKA_EC_PARAMS], True)[0])
            name = _CURVE_BY_PARAMS.get(params, "ec")
            return KeyInfo(handle, name, _EC_SIG.get(name, 132), _EC_BITS.get(name, 0))
        if ktype == PyKCS11.CKK_EC_EDWARDS:
            return KeyInfo(handle, "ed25519", 64)
        if ktype == PyKCS11.CKK_RSA:
            modulus = get(handle, [PyKCS11.CKA_MODULUS], True)[0]
            size = len(modulus) if modulus else 512
            return KeyInfo(handle, f"rsa-{size * 8}" if size * 8 in _RSA_TYPES else "rsa", size, size * 8)
        if ktype in (PyKCS11.CKK_AES, PyKCS11.CKK_GENERIC_SECRET):
            try:
                length = int(get(handle, [PyKCS11.CKA_VALUE_LEN])[0] or 0)
            except (PyKCS11.PyKCS11Error, TypeError, ValueError):
                length = 0
            if ktype == PyKCS11.CKK_AES:
                return KeyInfo(handle, _AES_TYPES.get(length, "aes"), 0)
            return KeyInfo(handle, _HMAC_TYPES.get(length, "hmac"), 64)
        return KeyInfo(handle, f"type-0x{ktype:x}", 512)

    def public_der(self, handle: Any, key_type: str) -> bytes:
        """DER SubjectPublicKeyInfo of a public key object (or of an RSA private key)."""
        get = self.session.require().getAttributeValue
        if key_type.startswith("rsa"):
            n, e = get(handle, [PyKCS11.CKA_MODULUS, PyKCS11.CKA_PUBLIC_EXPONENT], True)
            return spki_der(modulus=bytes(n), exponent=bytes(e))
        raw = bytes(get(handle, [PyKCS11.CKA_EC_POINT], True)[0])
        if key_type == "ed25519":
            return spki_der(ed25519=ec_point(raw, 32))
        if key_type not in CURVES:
            raise Refusal("user", "key_type_unsupported", f"cannot export a public key of type {key_type}")
        return spki_der(ec_params=CURVES[key_type], point=ec_point(raw, 1 + _EC_SIG[key_type]))

    def op_public_key(self, args: dict[str, Any]) -> bytes:
        key = self.find(arg(args, "key", str), PyKCS11.CKO_PUBLIC_KEY)
        return spki_pem(self.public_der(key.handle, key.key_type))

    def op_key_info(self, args: dict[str, Any]) -> dict[str, Any]:
        """What a name points at: label, id (hex), type and the classes present."""
        name = arg(args, "key", str)
        ref = self.ref(name)
        session = self.session.require()
        out: dict[str, Any] = {"key": name, "label": None, "id": None, "type": None, "classes": []}
        for cls in (PyKCS11.CKO_PUBLIC_KEY, PyKCS11.CKO_PRIVATE_KEY, PyKCS11.CKO_SECRET_KEY):
            found = self.objects(ref, cls)
            if not found:
                continue
            label, key_id = session.getAttributeValue(found[0], [PyKCS11.CKA_LABEL, PyKCS11.CKA_ID], True)
            out["classes"].append(CLASS_NAMES[cls])
            out["label"] = out["label"] or bytes(label).decode(errors="replace")
            out["id"] = out["id"] or bytes(key_id).hex()
            out["type"] = out["type"] or self.describe(found[0]).key_type
        if not out["classes"]:
            raise Refusal("user", "key_not_found", f"no key matching {name!r}")
        return out

    def op_key_fingerprint(self, args: dict[str, Any]) -> dict[str, Any]:
        """What identifies the key named ``key``: SHA-256 of its public key (DER SPKI) for a
        key pair; of its type, CKA_ID and check value (a MAC or an encryption of zeros) for a
        secret key. Refuses a name that fits two keys of a class."""
        name = arg(args, "key", str)
        ref = self.ref(name)
        private, secret = self.objects(ref, PyKCS11.CKO_PRIVATE_KEY), self.objects(ref, PyKCS11.CKO_SECRET_KEY)
        if private:
            public = self.objects(ref, PyKCS11.CKO_PUBLIC_KEY)
            handle = public[0] if public else private[0]
            info = self.describe(handle)
            if not public and not info.key_type.startswith("rsa"):
                raise Refusal("user", "public_key_missing", f"key {name!r} has no public key object to identify it")
            return {"label": name, "class": "key pair", "type": info.key_type,
                    "fingerprint": "sha256:" + sha256_hex(self.public_der(handle, info.key_type))}  # fmt: skip
        if secret:
            info = self.describe(secret[0])
            key_id = bytes(self.session.require().getAttributeValue(secret[0], [PyKCS11.CKA_ID], True)[0])
            material = info.key_type.encode() + b"\0" + key_id + b"\0" + self._check_value(secret[0], info)
            return {"label": name, "class": "secret key", "type": info.key_type,
                    "fingerprint": "sha256:" + sha256_hex(material)}  # fmt: skip
        raise Refusal("user", "key_not_found", f"no key labelled {name!r}")

    def _check_value(self, handle: Any, info: KeyInfo) -> bytes:
        """The key's check value: AES of a zero block, or an HMAC of a fixed text (b"" if the
        key may not do that; a device error is raised, never turned into another fingerprint)."""
        session = self.session.require()
        try:
            if info.key_type.startswith("aes"):
                return bytes(session.encrypt(handle, bytes(16), PyKCS11.Mechanism(PyKCS11.CKM_AES_ECB)))
            # Not an empty message: through p11-kit's RPC that leaves the operation active.
            return bytes(session.sign(handle, b"p11guard key check", PyKCS11.Mechanism(PyKCS11.CKM_SHA256_HMAC)))
        except PyKCS11.PyKCS11Error as exc:
            if ckr_kind(int(exc.value)) != "user":
                raise  # the device failed: no fingerprint now, rather than a wrong one
            return b""  # the key may not do this: its type and CKA_ID identify it

    def op_destroy(self, args: dict[str, Any]) -> int:
        label = arg(args, "label", str)
        session = self.session.require()
        found = session.findObjects([(PyKCS11.CKA_LABEL, label)])
        for handle in found:
            session.destroyObject(handle)
        self.forget(label)
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
