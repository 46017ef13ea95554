"""What runs inside a host process: one PyKCS11 module instance, one session, one thread.

This module is imported only in host processes. Every ``PyKCS11Error`` is translated into
an error reply by :meth:`Host.handle` -- the one boundary between the module and the wire.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import PyKCS11
from PyKCS11 import LowLevel

from p11guard.host._fastcall import FastSigner, handle_value
from p11guard.protocol import MECHANISMS, OPS, ckr_kind, ckr_name

__all__ = ["BadRequest", "Host", "KeyInfo"]

_RW_SESSION = PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
# Start-up errors that SoftHSM2 (and p11-kit in front of it) answer spuriously when many
# processes read the token at the same instant. Retried a few times; a PIN error never.
_SPURIOUS = {PyKCS11.CKR_GENERAL_ERROR, PyKCS11.CKR_BUFFER_TOO_SMALL}
_START_ATTEMPTS = 5
_MAX_RANDOM = 1024 * 1024

# DER of the named-curve OIDs and the Ed25519 OID, as CKA_EC_PARAMS holds them.
_CURVES = {
    "ec-p256": bytes.fromhex("06082a8648ce3d030107"),
    "ec-p384": bytes.fromhex("06052b81040022"),
    "ed25519": bytes.fromhex("06032b6570"),
}
_CURVE_BY_PARAMS = {v: k for k, v in _CURVES.items()}
_SIG_SIZE = {"ec-p256": 64, "ec-p384": 96, "ed25519": 64, "hmac-sha256": 32}


_EXPLAIN = {
    "group_loss": "the HSM group (or device) is lost",
    "session": "the session or a handle is no longer valid",
    "auth": "login refused for the PIN",
    "user": "the module refused the request",
    "internal": "the module failed",
}


class BadRequest(Exception):
    """The request is malformed; the host answers with a ``bad_request`` error and goes on."""


class _Refusal(Exception):
    """An error reply that did not come from the module (kind and name chosen by the host)."""

    def __init__(self, kind: str, name: str, message: str, ckr: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.ckr = ckr


@dataclass
class KeyInfo:
    """A resolved key: its handle (valid in this host's generation only) and its type."""

    handle: Any
    key_type: str
    sig_size: int
    value: int = 0

    def __post_init__(self) -> None:
        self.value = handle_value(self.handle)


def _arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    value = args.get(name, default)
    if value is ...:
        raise BadRequest(f"missing argument {name!r}")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRequest(f"argument {name!r} must be {want}, not {type(value).__name__}")
    return value


def _der_int(value: bytes) -> bytes:
    value = value.lstrip(b"\x00") or b"\x00"
    if value[0] & 0x80:
        value = b"\x00" + value
    return b"\x02" + _der_len(len(value)) + value


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def ecdsa_raw_to_der(raw: bytes) -> bytes:
    """PKCS#11's ``r || s`` to the DER ``SEQUENCE { r, s }`` that X.509, CMS and openssl use."""
    half = len(raw) // 2
    body = _der_int(raw[:half]) + _der_int(raw[half:])
    return b"\x30" + _der_len(len(body)) + body


def _der_read(buf: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    """One DER TLV of ``tag`` at ``pos``: (value, position after it)."""
    if pos + 2 > len(buf) or buf[pos] != tag:
        raise _Refusal("user", "signature_invalid", "ECDSA signature is not DER")
    n = buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    if pos + n > len(buf):
        raise _Refusal("user", "signature_invalid", "ECDSA signature is truncated")
    return buf[pos : pos + n], pos + n


def ecdsa_der_to_raw(der: bytes, size: int) -> bytes:
    """The inverse of :func:`ecdsa_raw_to_der`; ``size`` is the length of ``r || s``."""
    half = size // 2
    seq, _ = _der_read(der, 0, 0x30)
    r, pos = _der_read(seq, 0, 0x02)
    s, _ = _der_read(seq, pos, 0x02)
    r, s = r.lstrip(b"\x00"), s.lstrip(b"\x00")
    if len(r) > half or len(s) > half:
        raise _Refusal("user", "signature_invalid", "ECDSA signature does not fit the curve")
    return r.rjust(half, b"\x00") + s.rjust(half, b"\x00")


class Host:
    """The module, its session, its handle cache and its fault plan, in one process."""

    def __init__(self, *, generation: int, fault_injection: bool) -> None:
        self.generation = generation
        self.fault_injection = fault_injection
        self.lib: Any = None
        self.fast: FastSigner | None = None
        self.session: Any = None
        self.session_value = 0
        self.slot: Any = None
        self.token_label: str | None = None
        self.mechanisms: set[int] = set()
        self.keys: dict[tuple[str, int], KeyInfo] = {}
        self.login_attempts = 0
        self.sessions_opened = 0
        self._fail_plan: list[tuple[int, int, frozenset[str] | None]] = []  # [ckr, count, ops]
        self._hang_next: float = 0.0
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "open": self.op_open,
            "probe": self.op_probe,
            "ping": self.op_ping,
            "sign": self.op_sign,
            "verify": self.op_verify,
            "encrypt": self.op_encrypt,
            "decrypt": self.op_decrypt,
            "digest": self.op_digest,
            "random": self.op_random,
            "public_key": self.op_public_key,
            "generate_key_pair": self.op_generate_key_pair,
            "generate_secret": self.op_generate_secret,
            "destroy": self.op_destroy,
            "list_keys": self.op_list_keys,
            "fault": self.op_fault,
            "close": self.op_close,
        }

    # -- the boundary -------------------------------------------------------------------

    def load(self, module_path: str) -> None:
        """Load and initialise the module (``C_Initialize``)."""
        lib = PyKCS11.PyKCS11Lib()
        lib.load(module_path)
        self.lib = lib
        try:
            self.fast = FastSigner(module_path)
        except (OSError, AttributeError):
            self.fast = None  # PyKCS11's path works for every module

    def handle(self, request: Any) -> dict[str, Any]:
        """Answer one decoded request with a reply map; never raises."""
        rid = request.get("id") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict):
                raise BadRequest("request is not a map")
            if not isinstance(rid, int) or isinstance(rid, bool):
                raise BadRequest("request field 'id' must be an integer")
            gen = request.get("gen")
            if not isinstance(gen, int) or isinstance(gen, bool):
                raise BadRequest("request field 'gen' must be an integer")
            if gen != self.generation:
                raise _Refusal(
                    "stale_generation",
                    "stale_generation",
                    f"request of generation {gen} refused by a host of generation {self.generation}",
                )
            op = request.get("op")
            args = request.get("args", {})
            if not isinstance(op, str):
                raise BadRequest("request field 'op' must be a string")
            if not isinstance(args, dict):
                raise BadRequest("request field 'args' must be a map")
            if op == "batch":
                return {"id": rid, "ok": self.run_batch(args)}
            return {"id": rid, "ok": self.run(op, args)}
        except Exception as exc:
            return {"id": rid, "err": self.error_reply(exc)}

    def run_batch(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        items = _arg(args, "items", list)
        out: list[dict[str, Any]] = []
        for item in items:
            try:
                if not isinstance(item, dict):
                    raise BadRequest("batch item is not a map")
                op = item.get("op")
                if op in ("batch", "open", "close", "fault"):
                    raise BadRequest(f"op {op!r} is not allowed in a batch")
                item_args = item.get("args", {})
                if not isinstance(op, str) or not isinstance(item_args, dict):
                    raise BadRequest("batch item needs 'op' (string) and 'args' (map)")
                out.append({"ok": self.run(op, item_args)})
            except Exception as exc:
                out.append({"err": self.error_reply(exc)})
        return out

    def run(self, op: str, args: dict[str, Any]) -> Any:
        handler = self._handlers.get(op)
        if handler is None:
            known = ", ".join(sorted(OPS))
            raise BadRequest(f"unknown op {op!r} (known: {known})")
        if op != "fault":
            self._apply_faults(op)
        if op not in ("open", "ping", "fault", "close") and self.session is None:
            raise _Refusal("session", "no_session", "no open session: send 'open' first")
        return handler(args)

    @staticmethod
    def error_reply(exc: BaseException) -> dict[str, Any]:
        if isinstance(exc, PyKCS11.PyKCS11Error):
            code = int(exc.value)
            if code < 0:  # PyKCS11's own: -1 load failure, -2 template, -3 byte list
                return {"kind": "internal", "ckr": None, "name": "pykcs11", "message": str(exc)}
            kind = ckr_kind(code)
            return {"kind": kind, "ckr": code, "name": ckr_name(code), "message": _EXPLAIN[kind]}
        if isinstance(exc, _Refusal):
            return {"kind": exc.kind, "ckr": exc.ckr, "name": exc.name, "message": str(exc)}
        if isinstance(exc, BadRequest):
            return {"kind": "bad_request", "ckr": None, "name": "bad_request", "message": str(exc)}
        return {
            "kind": "internal",
            "ckr": None,
            "name": type(exc).__name__,
            "message": str(exc) or type(exc).__name__,
        }

    # -- faults -------------------------------------------------------------------------

    def _apply_faults(self, op: str) -> None:
        if self._hang_next:
            seconds, self._hang_next = self._hang_next, 0.0
            # A C call that holds the GIL, like a hung PKCS#11 call under PyKCS11.
            ctypes.PyDLL(None).usleep(ctypes.c_uint(int(seconds * 1_000_000)))
        for i, (ckr, count, ops) in enumerate(self._fail_plan):
            if ops is None or op in ops:
                if count <= 1:
                    del self._fail_plan[i]
                else:
                    self._fail_plan[i] = (ckr, count - 1, ops)
                raise PyKCS11.PyKCS11Error(ckr)

    def op_fault(self, args: dict[str, Any]) -> Any:
        if not self.fault_injection:
            raise _Refusal(
                "bad_request",
                "fault_injection_disabled",
                "fault injection is disabled for this host (testing.fault_injection = false)",
            )
        action = _arg(args, "action", str)
        if action == "fail_next":
            ops = args.get("ops")
            if ops is not None and not (isinstance(ops, list) and all(isinstance(o, str) for o in ops)):
                raise BadRequest("argument 'ops' must be a list of op names")
            self._fail_plan.append(
                (_arg(args, "ckr", int), _arg(args, "count", int, 1), frozenset(ops) if ops else None)
            )
            return True
        if action == "hang":
            self._hang_next = float(_arg(args, "seconds", (int, float)))
            return True
        if action == "crash":
            how = _arg(args, "how", str, "exit")
            if how == "exit":
                os._exit(13)
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "segv":
                ctypes.string_at(0)
            raise BadRequest(f"unknown crash {how!r} (exit, sigkill, segv)")
        raise BadRequest(f"unknown fault action {action!r} (fail_next, hang, crash)")

    # -- session ------------------------------------------------------------------------

    def _find_slot(self, token_label: str) -> Any:
        seen = []
        for slot in self.lib.getSlotList(tokenPresent=True):
            label = self.lib.getTokenInfo(slot).label.rstrip(" \x00")
            if label == token_label:
                return slot
            seen.append(label)
        # No token at all is how a lost group looks; other tokens but not ours is a module
        # that answers without our token (a member of another group, a wrong label).
        raise _Refusal(
            "group_loss",
            "token_label_unknown" if seen else "token_not_found",
            f"no token labelled {token_label!r}; labels seen: {seen or 'none'}",
            ckr=PyKCS11.CKR_TOKEN_NOT_PRESENT,
        )

    def op_open(self, args: dict[str, Any]) -> dict[str, Any]:
        token_label = _arg(args, "token_label", str)
        pin = _arg(args, "pin", str)
        # A renewal opens the new session before closing the old one: no logout/login churn
        # on the token (SoftHSM2 then answers other processes CKR_GENERAL_ERROR now and then).
        old, self.session = self.session, None
        self.keys.clear()
        try:
            return self._open(token_label, pin)
        finally:
            if old is not None:
                try:
                    old.closeSession()
                except PyKCS11.PyKCS11Error:
                    pass

    def _open(self, token_label: str, pin: str) -> dict[str, Any]:
        attempt = 0
        while True:
            attempt += 1
            session = None
            try:
                slot = self._find_slot(token_label)
                session = self.lib.openSession(slot, _RW_SESSION)
                self.login_attempts += 1
                try:
                    session.login(pin)
                except PyKCS11.PyKCS11Error as exc:
                    if exc.value != PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                        raise
                break
            except PyKCS11.PyKCS11Error as exc:
                if session is not None:
                    try:
                        session.closeSession()
                    except PyKCS11.PyKCS11Error:
                        pass
                # Only the spurious codes are retried: never a PIN error (it burns the
                # token's retry counter), never a missing token.
                if exc.value not in _SPURIOUS or attempt >= _START_ATTEMPTS:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * attempt)
        self.session, self.slot, self.token_label = session, slot, token_label
        self.session_value = handle_value(session.session)
        if self.fast is not None and not self.fast.shares_state(self.session_value):
            self.fast = None
        self.sessions_opened += 1
        self.mechanisms = {
            m for m in (PyKCS11.CKM.get(n) for n in self.lib.getMechanismList(slot)) if isinstance(m, int)
        }
        return {"pid": os.getpid(), "generation": self.generation, "sessions_opened": self.sessions_opened}

    def _drop_session(self) -> None:
        self.keys.clear()
        if self.session is not None:
            session, self.session = self.session, None
            try:
                session.closeSession()
            except PyKCS11.PyKCS11Error:
                pass

    def op_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        """Liveness and counters; works without a session."""
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "login_attempts": self.login_attempts,
            "sessions_opened": self.sessions_opened,
            "session": self.session is not None,
        }

    def op_close(self, args: dict[str, Any]) -> bool:
        if self.session is not None:
            try:
                self.session.logout()
            except PyKCS11.PyKCS11Error:
                pass
        self._drop_session()
        return True

    def op_probe(self, args: dict[str, Any]) -> dict[str, Any]:
        start = time.monotonic()
        info = self.lib.getTokenInfo(self.slot)
        self.session.generateRandom(16)
        return {
            "token_label": info.label.rstrip(" \x00"),
            "serial": info.serialNumber.strip(),
            "latency_s": time.monotonic() - start,
            "login_attempts": self.login_attempts,
            "sessions_opened": self.sessions_opened,
        }

    # -- keys ---------------------------------------------------------------------------

    def _key(self, label: str, cls: int) -> KeyInfo:
        cached = self.keys.get((label, cls))
        if cached is not None:
            return cached
        found = self.session.findObjects([(PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_CLASS, cls)])
        if not found:
            labels = sorted({k["label"] for k in self.op_list_keys({})})
            raise _Refusal(
                "user",
                "key_not_found",
                f"no {_CLASS_NAMES.get(cls, 'key')} labelled {label!r}; labels: {labels or 'none'}",
            )
        info = self._describe(found[0])
        self.keys[(label, cls)] = info
        return info

    def _describe(self, handle: Any) -> KeyInfo:
        (ktype,) = self.session.getAttributeValue(handle, [PyKCS11.CKA_KEY_TYPE])
        if ktype == PyKCS11.CKK_EC:
            params = bytes(self.session.getAttributeValue(handle, [PyKCS11.CKA_EC_PARAMS], True)[0])
            name = _CURVE_BY_PARAMS.get(params, "ec")
            return KeyInfo(handle, name, _SIG_SIZE.get(name, 132))
        if ktype == PyKCS11.CKK_EC_EDWARDS:
            return KeyInfo(handle, "ed25519", 64)
        if ktype == PyKCS11.CKK_RSA:
            modulus = self.session.getAttributeValue(handle, [PyKCS11.CKA_MODULUS], True)[0]
            size = len(modulus) if modulus else 512
            return KeyInfo(handle, f"rsa-{size * 8}" if size * 8 in (2048, 3072) else "rsa", size)
        if ktype == PyKCS11.CKK_AES:
            return KeyInfo(handle, "aes-256", 0)
        if ktype == PyKCS11.CKK_GENERIC_SECRET:
            return KeyInfo(handle, "hmac-sha256", 32)
        return KeyInfo(handle, f"type-0x{ktype:x}", 512)

    def _mechanism(self, name: str, key: KeyInfo, data: bytes) -> tuple[Any, bytes, bool]:
        """Returns (PyKCS11 mechanism, data to pass, ECDSA-DER?) for a signing mechanism."""
        kinds = MECHANISMS.get(name)
        if kinds is None:
            raise BadRequest(f"unknown mechanism {name!r} (known: {', '.join(sorted(MECHANISMS))})")
        if key.key_type not in kinds:
            raise _Refusal(
                "user",
                "mechanism_mismatch",
                f"mechanism {name!r} does not fit a {key.key_type} key (fits: {', '.join(sorted(kinds))})",
            )
        if name.startswith("ecdsa-"):
            combined = PyKCS11.CKM_ECDSA_SHA256 if name == "ecdsa-sha256" else PyKCS11.CKM_ECDSA_SHA384
            if combined in self.mechanisms:
                return PyKCS11.Mechanism(combined), data, True
            digest = hashlib.sha256 if name == "ecdsa-sha256" else hashlib.sha384
            return PyKCS11.Mechanism(PyKCS11.CKM_ECDSA), digest(data).digest(), True
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

    def _sign_class(self, mechanism: str) -> int:
        return int(PyKCS11.CKO_SECRET_KEY if mechanism == "hmac-sha256" else PyKCS11.CKO_PRIVATE_KEY)

    def op_sign(self, args: dict[str, Any]) -> bytes:
        label = _arg(args, "key", str)
        data = _arg(args, "data", bytes)
        name = _arg(args, "mechanism", str, "ecdsa-sha256")
        if name not in MECHANISMS:
            raise BadRequest(f"unknown mechanism {name!r} (known: {', '.join(sorted(MECHANISMS))})")
        key = self._key(label, self._sign_class(name))
        mech, payload, der = self._mechanism(name, key, data)
        ckm = int(mech.to_native().mechanism)
        if self.fast is not None and name != "rsa-pss-sha256":
            # Two module calls, not three: the buffer is sized from the key, no size query.
            rv, raw = self.fast.sign(self.session_value, ckm, key.value, payload, key.sig_size)
            if rv:
                raise PyKCS11.PyKCS11Error(rv)
            return ecdsa_raw_to_der(raw) if der else raw
        low, h = self.session.lib, self.session.session
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
        label = _arg(args, "key", str)
        data = _arg(args, "data", bytes)
        signature = _arg(args, "signature", bytes)
        name = _arg(args, "mechanism", str, "ecdsa-sha256")
        if name not in MECHANISMS:
            raise BadRequest(f"unknown mechanism {name!r} (known: {', '.join(sorted(MECHANISMS))})")
        cls = PyKCS11.CKO_SECRET_KEY if name == "hmac-sha256" else PyKCS11.CKO_PUBLIC_KEY
        key = self._key(label, cls)
        mech, payload, der = self._mechanism(name, key, data)
        if der:
            try:
                signature = ecdsa_der_to_raw(signature, key.sig_size)
            except _Refusal:
                return False
        try:
            return bool(self.session.verify(key.handle, payload, signature, mech))
        except PyKCS11.PyKCS11Error as exc:
            if exc.value == PyKCS11.CKR_SIGNATURE_LEN_RANGE:
                return False
            raise

    def _gcm(self, args: dict[str, Any], iv: bytes) -> Any:
        aad = _arg(args, "aad", bytes, b"")
        return PyKCS11.AES_GCM_Mechanism(iv, aad, 128)

    def op_encrypt(self, args: dict[str, Any]) -> bytes:
        label = _arg(args, "key", str)
        data = _arg(args, "data", bytes)
        name = _arg(args, "mechanism", str, "aes-gcm")
        if name != "aes-gcm":
            raise BadRequest(f"mechanism {name!r} cannot encrypt (known: aes-gcm)")
        key = self._key(label, PyKCS11.CKO_SECRET_KEY)
        if key.key_type != "aes-256":
            raise _Refusal("user", "mechanism_mismatch", f"aes-gcm does not fit a {key.key_type} key")
        iv = os.urandom(12)
        return iv + bytes(self.session.encrypt(key.handle, data, self._gcm(args, iv)))

    def op_decrypt(self, args: dict[str, Any]) -> bytes:
        label = _arg(args, "key", str)
        data = _arg(args, "data", bytes)
        name = _arg(args, "mechanism", str, "aes-gcm")
        if name != "aes-gcm":
            raise BadRequest(f"mechanism {name!r} cannot decrypt (known: aes-gcm)")
        if len(data) < 12 + 16:
            raise _Refusal("user", "data_len_range", "aes-gcm data must hold a 12-byte IV and a tag")
        key = self._key(label, PyKCS11.CKO_SECRET_KEY)
        try:
            return bytes(self.session.decrypt(key.handle, data[12:], self._gcm(args, data[:12])))
        except PyKCS11.PyKCS11Error as exc:
            # SoftHSM2 answers a failed GCM tag check with CKR_GENERAL_ERROR.
            if exc.value in (PyKCS11.CKR_GENERAL_ERROR, PyKCS11.CKR_ENCRYPTED_DATA_INVALID):
                raise _Refusal(
                    "user",
                    "decrypt_failed",
                    "aes-gcm authentication failed: wrong key or AAD, or the data was altered",
                    ckr=exc.value,
                ) from None
            raise

    def op_digest(self, args: dict[str, Any]) -> bytes:
        data = _arg(args, "data", bytes)
        name = _arg(args, "mechanism", str, "sha256")
        mechs = {"sha256": PyKCS11.CKM_SHA256, "sha384": PyKCS11.CKM_SHA384, "sha512": PyKCS11.CKM_SHA512}
        if name not in mechs:
            raise BadRequest(f"unknown digest {name!r} (known: {', '.join(mechs)})")
        return bytes(self.session.digest(data, PyKCS11.Mechanism(mechs[name])))

    def op_random(self, args: dict[str, Any]) -> bytes:
        n = _arg(args, "n", int)
        if not 0 < n <= _MAX_RANDOM:
            raise BadRequest(f"argument 'n' must be between 1 and {_MAX_RANDOM}")
        return bytes(self.session.generateRandom(n))

    def op_public_key(self, args: dict[str, Any]) -> bytes:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

        label = _arg(args, "key", str)
        key = self._key(label, PyKCS11.CKO_PUBLIC_KEY)
        get = self.session.getAttributeValue
        pub: Any
        if key.key_type.startswith("rsa"):
            n, e = get(key.handle, [PyKCS11.CKA_MODULUS, PyKCS11.CKA_PUBLIC_EXPONENT], True)
            pub = rsa.RSAPublicNumbers(int.from_bytes(bytes(e), "big"), int.from_bytes(bytes(n), "big"))
            pub = pub.public_key()
        else:
            point = bytes(get(key.handle, [PyKCS11.CKA_EC_POINT], True)[0])
            if point[:1] == b"\x04" and len(point) > 2 and point[1] == len(point) - 2:
                point = point[2:]  # the DER OCTET STRING wrapper
            elif point[:1] == b"\x04" and point[1] == 0x81:
                point = point[3:]
            if key.key_type == "ed25519":
                pub = ed25519.Ed25519PublicKey.from_public_bytes(point)
            else:
                curve = ec.SECP256R1() if key.key_type == "ec-p256" else ec.SECP384R1()
                pub = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        return bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _check_new_label(self, label: str) -> None:
        if not label or len(label) > 128:
            raise BadRequest("argument 'label' must be 1 to 128 characters")
        if self.session.findObjects([(PyKCS11.CKA_LABEL, label)]):
            raise _Refusal("user", "label_exists", f"a key labelled {label!r} already exists")

    def op_generate_key_pair(self, args: dict[str, Any]) -> dict[str, Any]:
        label = _arg(args, "label", str)
        ktype = _arg(args, "type", str)
        key_id = _arg(args, "id", bytes, os.urandom(8))
        common = [(PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_ID, key_id)]
        pub = [*common, (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY), (PyKCS11.CKA_VERIFY, True)]
        priv = [
            *common,
            (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
            (PyKCS11.CKA_SIGN, True),
            (PyKCS11.CKA_PRIVATE, True),
            (PyKCS11.CKA_SENSITIVE, True),
            (PyKCS11.CKA_EXTRACTABLE, False),
        ]
        if ktype in ("ec-p256", "ec-p384"):
            pub += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC), (PyKCS11.CKA_EC_PARAMS, _CURVES[ktype])]
            priv += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC)]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN)
        elif ktype == "ed25519":
            pub += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC_EDWARDS), (PyKCS11.CKA_EC_PARAMS, _CURVES[ktype])]
            priv += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC_EDWARDS)]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_EC_EDWARDS_KEY_PAIR_GEN)
        elif ktype in ("rsa-2048", "rsa-3072"):
            bits = int(ktype[4:])
            pub += [
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_RSA),
                (PyKCS11.CKA_MODULUS_BITS, bits),
                (PyKCS11.CKA_PUBLIC_EXPONENT, (0x01, 0x00, 0x01)),
                (PyKCS11.CKA_ENCRYPT, True),
            ]
            priv += [(PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_RSA), (PyKCS11.CKA_DECRYPT, True)]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_RSA_PKCS_KEY_PAIR_GEN)
        else:
            raise BadRequest(f"unknown key pair type {ktype!r} (known: ec-p256, ec-p384, rsa-2048, rsa-3072, ed25519)")
        self._check_new_label(label)
        self.session.generateKeyPair(pub, priv, mech)
        return {"label": label, "type": ktype, "id": key_id.hex()}

    def op_generate_secret(self, args: dict[str, Any]) -> dict[str, Any]:
        label = _arg(args, "label", str)
        ktype = _arg(args, "type", str)
        key_id = _arg(args, "id", bytes, os.urandom(8))
        template = [
            (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
            (PyKCS11.CKA_TOKEN, True),
            (PyKCS11.CKA_LABEL, label),
            (PyKCS11.CKA_ID, key_id),
            (PyKCS11.CKA_PRIVATE, True),
            (PyKCS11.CKA_SENSITIVE, True),
            (PyKCS11.CKA_EXTRACTABLE, False),
            (PyKCS11.CKA_VALUE_LEN, 32),
        ]
        if ktype == "aes-256":
            template += [
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
                (PyKCS11.CKA_ENCRYPT, True),
                (PyKCS11.CKA_DECRYPT, True),
            ]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_GEN)
        elif ktype == "hmac-sha256":
            template += [
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_GENERIC_SECRET),
                (PyKCS11.CKA_SIGN, True),
                (PyKCS11.CKA_VERIFY, True),
            ]
            mech = PyKCS11.Mechanism(PyKCS11.CKM_GENERIC_SECRET_KEY_GEN)
        else:
            raise BadRequest(f"unknown secret type {ktype!r} (known: aes-256, hmac-sha256)")
        self._check_new_label(label)
        self.session.generateKey(template, mech)
        return {"label": label, "type": ktype, "id": key_id.hex()}

    def op_destroy(self, args: dict[str, Any]) -> int:
        label = _arg(args, "label", str)
        found = self.session.findObjects([(PyKCS11.CKA_LABEL, label)])
        for handle in found:
            self.session.destroyObject(handle)
        self.keys = {k: v for k, v in self.keys.items() if k[0] != label}
        return len(found)

    def op_list_keys(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        keys: dict[str, dict[str, Any]] = {}
        for handle in self.session.findObjects([]):
            cls_i, name = self.session.getAttributeValue(handle, [PyKCS11.CKA_CLASS, PyKCS11.CKA_LABEL])
            if cls_i not in _CLASS_NAMES:
                continue
            key_id = self.session.getAttributeValue(handle, [PyKCS11.CKA_ID], True)[0]
            name = str(name)
            entry = keys.setdefault(name, {"label": name, "type": "", "classes": [], "id": ""})
            entry["classes"].append(_CLASS_NAMES[cls_i])
            entry["id"] = bytes(key_id).hex() if key_id else ""
            if not entry["type"] or cls_i == PyKCS11.CKO_PUBLIC_KEY:
                entry["type"] = self._describe(handle).key_type
        return sorted(keys.values(), key=lambda k: str(k["label"]))


_CLASS_NAMES = {
    PyKCS11.CKO_PRIVATE_KEY: "private key",
    PyKCS11.CKO_PUBLIC_KEY: "public key",
    PyKCS11.CKO_SECRET_KEY: "secret key",
}
_ = LowLevel  # imported so a broken PyKCS11 install fails at host start, not mid-call
