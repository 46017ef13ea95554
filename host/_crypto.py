"""Signing and hashing: sign, sign_digest, verify, digest, random, by the negotiated mechanisms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import PyKCS11

from p11guard.host._args import BadRequest, Refusal, arg
from p11guard.host._der import DerError, digest_info, ecdsa_der_to_raw, ecdsa_raw_to_der
from p11guard.host._fastcall import vector_bytes
from p11guard.host._keys import KeyInfo, Keys
from p11guard.host._mechs import HASH_CKM, MGF, Plan
from p11guard.host._session import Session
from p11guard.protocol import DIGEST_SIZES, MECHANISMS

__all__ = ["Crypto", "sha2"]

T = TypeVar("T")
_MAX_RANDOM = 1024 * 1024
#: Mechanisms whose PyKCS11 form carries parameters: not for the ctypes fast path.
_WITH_PARAMS = frozenset(
    {PyKCS11.CKM_RSA_PKCS_PSS} | {getattr(PyKCS11, f"CKM_SHA{n}_RSA_PKCS_PSS") for n in (256, 384, 512)}
)


def sha2(name: str, data: bytes) -> bytes:
    """SHA-2 of ``data``, when the token lacks the combined mechanism (SoftHSM2: raw ECDSA only).

    CPython's own SHA-2 modules, not :mod:`hashlib`: hashlib loads OpenSSL's libcrypto,
    +3.6 MiB in every host (measured 10.6 -> 14.2 MiB); these cost nothing measurable.
    The constructor is looked up once per name (an import per call cost ~7% of a host's
    time signing ECDSA on SoftHSM2).
    """
    new = _SHA2.get(name)
    if new is None:
        new = _SHA2[name] = _sha2_constructor(name)
    return bytes(new(data).digest())


_SHA2: dict[str, Callable[[bytes], Any]] = {}


def _sha2_constructor(name: str) -> Callable[[bytes], Any]:
    import importlib

    for module in ("_sha2", "_sha512" if name != "sha256" else "_sha256"):  # 3.12+, then 3.11
        try:
            return cast(Callable[[bytes], Any], getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    import hashlib

    return lambda data: hashlib.new(name, data)


class Crypto:
    """Operations on keys found by :class:`Keys`, in the one session of :class:`Session`."""

    def __init__(self, session: Session, keys: Keys) -> None:
        self.session = session
        self.keys = keys

    @staticmethod
    def _name(args: dict[str, Any], default: str = "ecdsa-sha256") -> str:
        name: str = arg(args, "mechanism", str, default)
        if name not in MECHANISMS:
            raise BadRequest(f"unknown mechanism {name!r} (known: {', '.join(MECHANISMS)})")
        return name

    def _key(self, args: dict[str, Any], name: str, cls: int) -> KeyInfo:
        """The key named in ``args``, checked to fit mechanism ``name``."""
        key = self.keys.find(arg(args, "key", str), cls)
        fits = MECHANISMS[name]
        if key.key_type not in fits:
            raise Refusal(
                "user",
                "mechanism_mismatch",
                f"mechanism {name!r} does not fit a {key.key_type} key (fits: {', '.join(sorted(fits))})",
            )
        return key

    def _plan(self, name: str, key: KeyInfo, *, digest: bool = False) -> Plan:
        plan = self.session.negotiated.plan(name, "sign", digest=digest)
        if key.bits and plan.max_size and not plan.min_size <= key.bits <= plan.max_size:
            raise Refusal(
                "user",
                "key_size_unsupported",
                f"the token does {name!r} with keys of {plan.min_size} to {plan.max_size} bits; "
                f"this {key.key_type} key has {key.bits}",
            )
        return plan

    @staticmethod
    def _mechanism(plan: Plan) -> Any:
        digest = MECHANISMS[plan.name].digest
        if plan.ckm in _WITH_PARAMS:
            assert digest is not None
            return PyKCS11.RSA_PSS_Mechanism(plan.ckm, HASH_CKM[digest], MGF[digest], DIGEST_SIZES[digest])
        return PyKCS11.Mechanism(plan.ckm)

    @staticmethod
    def _payload(plan: Plan, data: bytes, prehashed: bool = False) -> bytes:
        """What the token signs: the data, its digest (a raw mechanism), or a DER DigestInfo
        of it (raw RSA PKCS#1 v1.5)."""
        digest_name = MECHANISMS[plan.name].digest
        if not prehashed and plan.prehash is None:
            return data
        assert digest_name is not None
        digest = data if prehashed else sha2(digest_name, data)
        return digest_info(digest_name, digest) if plan.ckm == PyKCS11.CKM_RSA_PKCS else digest

    def _sign(self, key: KeyInfo, plan: Plan, payload: bytes) -> bytes:
        size = DIGEST_SIZES[plan.name[5:]] if plan.name.startswith("hmac-") else key.sig_size
        fast = self.session.fast
        raw: bytes
        if fast is not None and plan.ckm not in _WITH_PARAMS:
            # Two module calls, not three: the buffer is sized from the key, no size query.
            rv, raw = fast.sign(self.session.session_value, plan.ckm, key.value, payload, size)
            if rv:
                raise PyKCS11.PyKCS11Error(rv)
        else:
            session = self.session.require()
            low, h = session.lib, session.session
            mech = self._mechanism(plan)  # held: its parameters must outlive the call
            rv = low.C_SignInit(h, mech.to_native(), key.handle)
            if rv != PyKCS11.CKR_OK:
                raise PyKCS11.PyKCS11Error(rv)
            signature = PyKCS11.ckbytelist([0] * size)
            rv = low.C_Sign(h, PyKCS11.ckbytelist(payload), signature)
            if rv != PyKCS11.CKR_OK:
                raise PyKCS11.PyKCS11Error(rv)
            raw = vector_bytes(signature)
        return ecdsa_raw_to_der(raw) if plan.name.startswith("ecdsa-") else raw

    def _run(self, name: str, key: KeyInfo, digest: bool, run: Callable[[Plan], T], learn: bool = True) -> T:
        """``run`` by the negotiated plan; if the token refuses a mechanism it listed, the
        session's table learns it and the next plan is tried (the raw mechanism with the
        hash in the host, or a refusal that names the token and what it offers)."""
        while True:
            plan = self._plan(name, key, digest=digest)
            try:
                return run(plan)
            except PyKCS11.PyKCS11Error as exc:
                if not self.session.negotiated.refused(plan, exc.value, learn and plan.ckm in _WITH_PARAMS):
                    raise

    def op_sign(self, args: dict[str, Any]) -> bytes:
        data = arg(args, "data", bytes)
        name = self._name(args)
        self.session.negotiated.plan(name, "sign")  # a mechanism the token lacks: refused first, named
        key = self._key(args, name, PyKCS11.CKO_SECRET_KEY if name.startswith("hmac-") else PyKCS11.CKO_PRIVATE_KEY)
        return self._run(name, key, False, lambda plan: self._sign(key, plan, self._payload(plan, data)))

    def _digest_arg(self, args: dict[str, Any], name: str) -> bytes:
        digest: bytes = arg(args, "digest", bytes)
        want = MECHANISMS[name].digest
        if want is not None and len(digest) != DIGEST_SIZES[want]:
            raise Refusal(
                "user",
                "digest_length",
                f"{name!r} signs a {want.upper()} digest of {DIGEST_SIZES[want]} bytes, not {len(digest)} bytes",
            )
        return digest

    def op_sign_digest(self, args: dict[str, Any]) -> bytes:
        """Sign a digest computed elsewhere (ECDSA, RSA PKCS#1 v1.5, RSA-PSS): the token's
        raw mechanism; the digest's algorithm is the mechanism's and its length is checked."""
        name = self._name(args)
        if MECHANISMS[name].digest is None or name.startswith("hmac-"):
            raise BadRequest(f"mechanism {name!r} cannot sign a pre-computed digest (ECDSA and RSA can)")
        digest = self._digest_arg(args, name)
        self.session.negotiated.plan(name, "sign", digest=True)
        key = self._key(args, name, PyKCS11.CKO_PRIVATE_KEY)
        return self._run(name, key, True, lambda plan: self._sign(key, plan, self._payload(plan, digest, True)))

    def op_verify(self, args: dict[str, Any]) -> bool:
        signature = arg(args, "signature", bytes)
        name = self._name(args)
        prehashed = "digest" in args
        data = self._digest_arg(args, name) if prehashed else arg(args, "data", bytes)
        self.session.negotiated.plan(name, "sign", digest=prehashed)
        key = self._key(args, name, PyKCS11.CKO_SECRET_KEY if name.startswith("hmac-") else PyKCS11.CKO_PUBLIC_KEY)
        if name.startswith("ecdsa-"):
            try:
                signature = ecdsa_der_to_raw(signature, key.sig_size)
            except DerError:
                return False

        def verify(plan: Plan) -> bool:
            payload = self._payload(plan, data, prehashed)
            try:
                return bool(self.session.require().verify(key.handle, payload, signature, self._mechanism(plan)))
            except PyKCS11.PyKCS11Error as exc:
                if exc.value == PyKCS11.CKR_SIGNATURE_LEN_RANGE:
                    return False
                raise

        return self._run(name, key, prehashed, verify, learn=False)

    def leave_active(self, args: dict[str, Any]) -> bool:
        """A fault: ``C_SignInit`` with the key and mechanism of ``args`` and no ``C_Sign``,
        so the session's next operation meets ``CKR_OPERATION_ACTIVE``."""
        name = self._name(args)
        key = self._key(args, name, PyKCS11.CKO_SECRET_KEY if name.startswith("hmac-") else PyKCS11.CKO_PRIVATE_KEY)
        session = self.session.require()
        mech = self._mechanism(self._plan(name, key))
        rv = session.lib.C_SignInit(session.session, mech.to_native(), key.handle)
        if rv != PyKCS11.CKR_OK:
            raise PyKCS11.PyKCS11Error(rv)
        return True

    def op_digest(self, args: dict[str, Any]) -> bytes:
        data = arg(args, "data", bytes)
        name = arg(args, "mechanism", str, "sha256")
        if name not in HASH_CKM:
            raise BadRequest(f"unknown digest {name!r} (known: {', '.join(HASH_CKM)})")
        return bytes(self.session.require().digest(data, PyKCS11.Mechanism(HASH_CKM[name])))

    def op_random(self, args: dict[str, Any]) -> bytes:
        n = arg(args, "n", int)
        if not 0 < n <= _MAX_RANDOM:
            raise BadRequest(f"argument 'n' must be between 1 and {_MAX_RANDOM}")
        return bytes(self.session.require().generateRandom(n))
