"""Keys by label: lookup (cached per session), description, templates, create, destroy, list."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from typing import Any

import PyKCS11

from p11guard.host._args import BadRequest, Refusal, arg
from p11guard.host._der import ec_point, spki_der, spki_pem
from p11guard.host._fastcall import handle_value
from p11guard.host._session import Session, jitter

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


@contextlib.contextmanager
def _label_lock(token_label: str, label: str) -> Iterator[None]:
    """Hosts on this machine (of every guard and process) create one label at a time.

    A token store shared by processes may not show one creator's new object to another
    that writes at the same instant (SoftHSM2's file store misses such a concurrent
    write), so the check for a twin after creating cannot be trusted alone on one machine;
    across machines it is all there is (a network HSM shows every client the same objects).
    A host killed while holding the lock releases it with its death.
    """
    folder = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"p11guard-labels-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    name = _sha256(f"{token_label}\0{label}".encode())[:32]
    fd = os.open(os.path.join(folder, name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    from p11guard.host._crypto import sha2

    return sha2("sha256", data).hex()


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
        found = self._objects(label, cls)
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

    def _objects(self, label: str, cls: int) -> list[Any]:
        """The objects of class ``cls`` labelled ``label``: one at most, or a refusal that
        names them -- a label that names two keys would pair a signature with the wrong one."""
        session = self.session.require()
        found = list(session.findObjects([(PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_CLASS, cls)]))
        if len(found) > 1:
            ids = sorted(bytes(session.getAttributeValue(h, [PyKCS11.CKA_ID], True)[0]).hex() or "none" for h in found)
            raise Refusal(
                "user",
                "label_ambiguous",
                f"label {label!r} names {len(found)} {CLASS_NAMES.get(cls, 'object')}s (CKA_ID {', '.join(ids)}); "
                "one label must name one key: destroy the extra ones or give them their own labels",
            )
        return found

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

    def public_der(self, handle: Any, key_type: str) -> bytes:
        """DER SubjectPublicKeyInfo of a public key object (or of an RSA private key)."""
        get = self.session.require().getAttributeValue
        if key_type.startswith("rsa"):
            n, e = get(handle, [PyKCS11.CKA_MODULUS, PyKCS11.CKA_PUBLIC_EXPONENT], True)
            return spki_der(modulus=bytes(n), exponent=bytes(e))
        raw = bytes(get(handle, [PyKCS11.CKA_EC_POINT], True)[0])
        if key_type == "ed25519":
            return spki_der(ed25519=ec_point(raw, 32))
        if key_type not in _CURVES:
            raise Refusal("user", "key_type_unsupported", f"cannot export a public key of type {key_type}")
        return spki_der(ec_params=_CURVES[key_type], point=ec_point(raw, 1 + _SIG_SIZE[key_type]))

    def op_public_key(self, args: dict[str, Any]) -> bytes:
        key = self.find(arg(args, "key", str), PyKCS11.CKO_PUBLIC_KEY)
        return spki_pem(self.public_der(key.handle, key.key_type))

    def op_key_fingerprint(self, args: dict[str, Any]) -> dict[str, Any]:
        """What identifies the key named ``key``: SHA-256 of its public key (DER SPKI) for a
        key pair; of its type, CKA_ID and check value (a MAC or an encryption of zeros) for a
        secret key. Refuses a label that names two keys of a class."""
        label = arg(args, "key", str)
        private, secret = self._objects(label, PyKCS11.CKO_PRIVATE_KEY), self._objects(label, PyKCS11.CKO_SECRET_KEY)
        if private:
            public = self._objects(label, PyKCS11.CKO_PUBLIC_KEY)
            handle = public[0] if public else private[0]
            info = self.describe(handle)
            if not public and not info.key_type.startswith("rsa"):
                raise Refusal("user", "public_key_missing", f"key {label!r} has no public key object to identify it")
            return {"label": label, "class": "key pair", "type": info.key_type,
                    "fingerprint": "sha256:" + _sha256(self.public_der(handle, info.key_type))}  # fmt: skip
        if secret:
            info = self.describe(secret[0])
            key_id = bytes(self.session.require().getAttributeValue(secret[0], [PyKCS11.CKA_ID], True)[0])
            material = info.key_type.encode() + b"\0" + key_id + b"\0" + self._check_value(secret[0], info)
            return {"label": label, "class": "secret key", "type": info.key_type,
                    "fingerprint": "sha256:" + _sha256(material)}  # fmt: skip
        raise Refusal("user", "key_not_found", f"no key labelled {label!r}")

    def _check_value(self, handle: Any, info: KeyInfo) -> bytes:
        """The key's check value: AES of a zero block, or an HMAC of a fixed text (b"" if refused)."""
        session = self.session.require()
        try:
            if info.key_type.startswith("aes"):
                return bytes(session.encrypt(handle, bytes(16), PyKCS11.Mechanism(PyKCS11.CKM_AES_ECB)))
            # Not an empty message: through p11-kit's RPC that leaves the operation active.
            return bytes(session.sign(handle, b"p11guard key check", PyKCS11.Mechanism(PyKCS11.CKM_SHA256_HMAC)))
        except PyKCS11.PyKCS11Error:
            return b""

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
        session = self.session.require()
        with _label_lock(self.session.token_label or "", label):
            self._check_new_label(label)
            pub_handle, priv_handle = session.generateKeyPair(pub, priv, mech)
            self._no_twin(label, PyKCS11.CKO_PRIVATE_KEY, key_id, [pub_handle, priv_handle])
        fingerprint = "sha256:" + _sha256(self.public_der(pub_handle, ktype))
        return {"label": label, "type": ktype, "id": key_id.hex(), "fingerprint": fingerprint}

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
        with _label_lock(self.session.token_label or "", label):
            self._check_new_label(label)
            handle = self.session.require().generateKey(template, mech)
            self._no_twin(label, PyKCS11.CKO_SECRET_KEY, key_id, [handle])
        fingerprint = self.op_key_fingerprint({"key": label})["fingerprint"]
        return {"label": label, "type": ktype, "id": key_id.hex(), "fingerprint": fingerprint}

    def _no_twin(self, label: str, cls: int, key_id: bytes, made: list[Any]) -> None:
        """Another process made a key of this label at the same moment: destroy what was
        just made here and answer ``label_taken``. Two keys under one label never stay (if
        both creators see each other, both step back: the label is free for a retry)."""
        session = self.session.require()
        twins = session.findObjects([(PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_CLASS, cls)])
        if len(twins) < 2:
            # A token store shared by processes (SoftHSM2's files) may show another
            # process's new object a moment late: look once more after that moment.
            time.sleep(jitter(0.03, 0.06))
            twins = session.findObjects([(PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_CLASS, cls)])
        if len(twins) < 2:
            return
        ours = [(PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_ID, key_id)]  # by id: robust to stale handles
        for _ in range(3):
            for handle in session.findObjects(ours) or made:
                try:
                    session.destroyObject(handle)
                except PyKCS11.PyKCS11Error:
                    continue
            made = []
            if not session.findObjects(ours):
                break
        others = []
        for handle in twins:
            if handle not in made:
                try:  # the other creator may be stepping back at this very moment
                    others.append(bytes(session.getAttributeValue(handle, [PyKCS11.CKA_ID], True)[0]).hex())
                except PyKCS11.PyKCS11Error:
                    continue
        raise Refusal(
            "user",
            "label_taken",
            f"label {label!r} was taken by a key made at the same moment elsewhere "
            f"(CKA_ID {', '.join(sorted(others)) or 'gone already'}); "
            "the one made here was destroyed: use that key, or another label",
        )

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
