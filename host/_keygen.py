"""Making keys on the token: key pairs, secrets, and the common guard around every creation
(one creator per label on this machine, the label checked free, twins made elsewhere undone)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import PyKCS11

from p11guard.host._args import BadRequest, Refusal, arg
from p11guard.host._keys import CURVES, Keys, sha256_hex
from p11guard.host._session import jitter
from p11guard.protocol import KEY_TYPES, SECRET_TYPES

__all__ = ["KeyMaker", "secret_template"]

_RSA_BITS = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}
_SECRET_BYTES = {"aes-128": 16, "aes-192": 24, "aes-256": 32, "hmac-sha256": 32, "hmac-sha384": 48, "hmac-sha512": 64}


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
    name = sha256_hex(f"{token_label}\0{label}".encode())[:32]
    fd = os.open(os.path.join(folder, name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _template(cls: int, label: str, key_id: bytes, *extra: tuple[int, Any]) -> list[tuple[int, Any]]:
    """The attributes every key p11guard makes has: on the token, labelled, with an id;
    private and secret keys are also private and sensitive, and never extractable unless
    asked (a secret to be wrapped)."""
    common = [(PyKCS11.CKA_CLASS, cls), (PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_ID, key_id)]
    if cls != PyKCS11.CKO_PUBLIC_KEY:
        common += [(PyKCS11.CKA_PRIVATE, True), (PyKCS11.CKA_SENSITIVE, True)]
        if not any(attr == PyKCS11.CKA_EXTRACTABLE for attr, _ in extra):
            common.append((PyKCS11.CKA_EXTRACTABLE, False))
    return common + list(extra)


def secret_template(label: str, key_id: bytes, ktype: str, extractable: bool = False, sized: bool = True) -> list[Any]:
    """The template of a secret key of ``ktype`` (``sized``: with its CKA_VALUE_LEN, for
    generation and derivation; an unwrapped key takes its length from the wrapped bytes)."""
    if ktype.startswith("aes-"):
        usage = [PyKCS11.CKA_ENCRYPT, PyKCS11.CKA_DECRYPT, PyKCS11.CKA_WRAP, PyKCS11.CKA_UNWRAP]
        key_type = PyKCS11.CKK_AES
    elif ktype.startswith("hmac-"):
        usage, key_type = [PyKCS11.CKA_SIGN, PyKCS11.CKA_VERIFY], PyKCS11.CKK_GENERIC_SECRET
    else:
        raise BadRequest(f"unknown secret type {ktype!r} (known: {', '.join(SECRET_TYPES)})")
    extra: list[tuple[int, Any]] = [(PyKCS11.CKA_KEY_TYPE, key_type), *((u, True) for u in usage)]
    if sized:
        extra.append((PyKCS11.CKA_VALUE_LEN, _SECRET_BYTES[ktype]))
    if extractable:
        extra.append((PyKCS11.CKA_EXTRACTABLE, True))
    return _template(PyKCS11.CKO_SECRET_KEY, label, key_id, *extra)


class KeyMaker:
    """Generation, and the guard every creation of a labelled key goes through."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.session = keys.session

    def check_new_label(self, label: str) -> None:
        if not label or len(label) > 128:
            raise BadRequest("argument 'label' must be 1 to 128 characters")
        if self.session.require().findObjects([(PyKCS11.CKA_LABEL, label)]):
            raise Refusal("user", "label_exists", f"a key labelled {label!r} already exists")

    def create(self, label: str, cls: int, key_id: bytes, make: Callable[[], list[Any]]) -> None:
        """Run ``make`` (which returns the handles it made) under the label's lock, with
        the label checked free before and no twin after."""
        with _label_lock(self.session.token_label or "", label):
            self.check_new_label(label)
            made = make()
            self._no_twin(label, cls, key_id, made)
        self.keys.forget(label)

    def op_generate_key_pair(self, args: dict[str, Any]) -> dict[str, Any]:
        label = arg(args, "label", str)
        ktype = arg(args, "type", str)
        key_id = arg(args, "id", bytes, os.urandom(8))
        pub = _template(PyKCS11.CKO_PUBLIC_KEY, label, key_id, (PyKCS11.CKA_VERIFY, True))
        priv = _template(PyKCS11.CKO_PRIVATE_KEY, label, key_id, (PyKCS11.CKA_SIGN, True))
        if ktype in ("ec-p256", "ec-p384", "ec-p521"):
            pub += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC), (PyKCS11.CKA_EC_PARAMS, CURVES[ktype])]
            priv += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC), (PyKCS11.CKA_DERIVE, True)]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN)
        elif ktype == "ed25519":
            pub += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC_EDWARDS), (PyKCS11.CKA_EC_PARAMS, CURVES[ktype])]
            priv += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC_EDWARDS)]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_EC_EDWARDS_KEY_PAIR_GEN)
        elif ktype in _RSA_BITS:
            pub += [
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_RSA),
                (PyKCS11.CKA_MODULUS_BITS, _RSA_BITS[ktype]),
                (PyKCS11.CKA_PUBLIC_EXPONENT, (0x01, 0x00, 0x01)),
                (PyKCS11.CKA_ENCRYPT, True),
                (PyKCS11.CKA_WRAP, True),
            ]
            priv += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_RSA), (PyKCS11.CKA_DECRYPT, True), (PyKCS11.CKA_UNWRAP, True)]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_RSA_PKCS_KEY_PAIR_GEN)
        else:
            raise BadRequest(f"unknown key pair type {ktype!r} (known: {', '.join(KEY_TYPES)})")
        bits = _RSA_BITS.get(ktype) or {"ec-p256": 256, "ec-p384": 384, "ec-p521": 521}.get(ktype, 0)
        self.session.negotiated.check_generate(ktype, bits)
        session = self.session.require()
        handles: list[Any] = []

        def make() -> list[Any]:
            handles.extend(session.generateKeyPair(pub, priv, mech))  # (public, private)
            return handles

        self.create(label, PyKCS11.CKO_PRIVATE_KEY, key_id, make)
        fingerprint = "sha256:" + sha256_hex(self.keys.public_der(handles[0], ktype))
        return {"label": label, "type": ktype, "id": key_id.hex(), "fingerprint": fingerprint}

    def op_generate_secret(self, args: dict[str, Any]) -> dict[str, Any]:
        label = arg(args, "label", str)
        ktype = arg(args, "type", str)
        key_id = arg(args, "id", bytes, os.urandom(8))
        template = secret_template(label, key_id, ktype, arg(args, "extractable", bool, False))
        gen = PyKCS11.CKM_AES_KEY_GEN if ktype.startswith("aes-") else PyKCS11.CKM_GENERIC_SECRET_KEY_GEN
        self.session.negotiated.check_generate(ktype)
        session = self.session.require()
        self.create(
            label, PyKCS11.CKO_SECRET_KEY, key_id, lambda: [session.generateKey(template, PyKCS11.Mechanism(gen))]
        )
        return self.made(label, key_id)

    def made(self, label: str, key_id: bytes) -> dict[str, Any]:
        """The answer of an op that made a secret key."""
        made = self.keys.op_key_fingerprint({"key": label})
        # The type the token reports: one that records no length (an unwrapped key on
        # SoftHSM2) says "aes" or "hmac".
        return {"label": label, "type": made["type"], "id": key_id.hex(), "fingerprint": made["fingerprint"]}

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
