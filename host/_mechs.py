"""Mechanism negotiation: what the token offers, read once per session, and the choice per name.

For each name of :data:`p11guard.protocol.MECHANISMS` the host picks the token's combined
mechanism when it lists one with the flag the use needs (``CKM_SHA256_RSA_PKCS`` with
``CKF_SIGN``), else the raw one with the hash done in the host (``CKM_ECDSA``,
``CKM_RSA_PKCS`` over a DER DigestInfo, ``CKM_RSA_PKCS_PSS`` with the digest), else none:
using that name is then refused with an error naming the token, the mechanism and what the
token offers instead. ``C_GetMechanismList`` is read through PyKCS11's low level, by number
(PyKCS11 1.5.20's ``getMechanismList`` adds a ``CKM_ML_DSA`` no token listed).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import PyKCS11

from p11guard.host._args import BadRequest, Refusal
from p11guard.protocol import KEY_TYPES, MECHANISMS, SECRET_TYPES, mechanisms_for

__all__ = ["GENERATE", "HASH_CKM", "MGF", "Negotiated", "Plan", "read_mechanisms"]

HASH_CKM = {"sha256": PyKCS11.CKM_SHA256, "sha384": PyKCS11.CKM_SHA384, "sha512": PyKCS11.CKM_SHA512}
MGF = {"sha256": PyKCS11.CKG_MGF1_SHA256, "sha384": PyKCS11.CKG_MGF1_SHA384, "sha512": PyKCS11.CKG_MGF1_SHA512}
_SHA = {"sha256": "SHA256", "sha384": "SHA384", "sha512": "SHA512"}
_FLAG = {
    "sign": PyKCS11.CKF_SIGN,
    "encrypt": PyKCS11.CKF_ENCRYPT,
    "wrap": PyKCS11.CKF_WRAP,
    "derive": PyKCS11.CKF_DERIVE,
}
_ALL_FLAGS = sum(_FLAG.values())
_VERBS = {"sign": "signing", "encrypt": "encryption", "wrap": "key wrapping", "derive": "key derivation"}
#: What a token answers for a mechanism (or its parameters) it listed but will not do.
_REFUSALS = frozenset({PyKCS11.CKR_MECHANISM_INVALID, PyKCS11.CKR_MECHANISM_PARAM_INVALID, PyKCS11.CKR_ARGUMENTS_BAD})
#: Key generation mechanisms, read with the others.
GENERATE = {
    "ec": PyKCS11.CKM_EC_KEY_PAIR_GEN,
    "ed25519": PyKCS11.CKM_EC_EDWARDS_KEY_PAIR_GEN,
    "rsa": PyKCS11.CKM_RSA_PKCS_KEY_PAIR_GEN,
    "aes": PyKCS11.CKM_AES_KEY_GEN,
    "hmac": PyKCS11.CKM_GENERIC_SECRET_KEY_GEN,
}


def _ckm(name: str) -> int:
    return int(getattr(PyKCS11, name))


def _candidates(name: str) -> tuple[int | None, int | None]:
    """(the combined mechanism, the raw one the host pre-hashes for) of a name."""
    digest = MECHANISMS[name].digest
    if name.startswith("ecdsa-"):
        return _ckm(f"CKM_ECDSA_{_SHA[str(digest)]}"), PyKCS11.CKM_ECDSA
    if name.startswith("rsa-pkcs1-"):
        return _ckm(f"CKM_{_SHA[str(digest)]}_RSA_PKCS"), PyKCS11.CKM_RSA_PKCS
    if name.startswith("rsa-pss-"):
        return _ckm(f"CKM_{_SHA[str(digest)]}_RSA_PKCS_PSS"), PyKCS11.CKM_RSA_PKCS_PSS
    if name.startswith("hmac-"):
        return _ckm(f"CKM_{name[5:].upper()}_HMAC"), None
    single = {
        "ed25519": PyKCS11.CKM_EDDSA,
        "aes-gcm": PyKCS11.CKM_AES_GCM,
        "aes-cbc-pad": PyKCS11.CKM_AES_CBC_PAD,
        "rsa-oaep-sha256": PyKCS11.CKM_RSA_PKCS_OAEP,
        "aes-key-wrap-pad": PyKCS11.CKM_AES_KEY_WRAP_PAD,
        "ecdh": PyKCS11.CKM_ECDH1_DERIVE,
    }
    return single[name], None


def _ckm_name(ckm: int | None) -> str | None:
    if ckm is None:
        return None
    if ckm == PyKCS11.CKM_EC_KEY_PAIR_GEN:  # PyKCS11 names it by its old alias
        return "CKM_EC_KEY_PAIR_GEN"
    name = PyKCS11.CKM.get(ckm)
    return str(name) if isinstance(name, str) else f"CKM_0x{ckm:X}"


def read_mechanisms(lib: Any, slot: int) -> dict[int, tuple[int, int, int]]:
    """The token's mechanisms p11guard may use: ``{ckm: (min key size, max key size, flags)}``.

    ``C_GetMechanismInfo`` is asked only for those (a mechanism it will not describe is
    taken with every flag: the call itself then gives the token's answer)."""
    listed = PyKCS11.LowLevel.ckulonglist()
    rv = lib.lib.C_GetMechanismList(slot, listed)
    if rv != PyKCS11.CKR_OK:
        raise PyKCS11.PyKCS11Error(rv)
    wanted = {c for name in MECHANISMS for c in _candidates(name) if c is not None} | set(GENERATE.values())
    out: dict[int, tuple[int, int, int]] = {}
    for ckm in (int(m) for m in listed):
        if ckm not in wanted:
            continue
        info = PyKCS11.LowLevel.CK_MECHANISM_INFO()
        if lib.lib.C_GetMechanismInfo(slot, ckm, info) == PyKCS11.CKR_OK:
            out[ckm] = (int(info.ulMinKeySize), int(info.ulMaxKeySize), int(info.flags))
        else:
            out[ckm] = (0, 0, _ALL_FLAGS)
    return out


class Plan(NamedTuple):
    """How one name is done on this token."""

    name: str
    ckm: int  #: the mechanism to call
    prehash: str | None  #: the digest the host computes first (a raw mechanism), else None
    min_size: int
    max_size: int


class Negotiated:
    """The choice for every mechanism name on one token (made at session open, and
    corrected when the token refuses a mechanism it listed: see :meth:`refused`)."""

    def __init__(self, available: dict[int, tuple[int, int, int]], token: dict[str, str], hint: str = "") -> None:
        self.available = available
        self.token = token
        self.hint = hint  #: said with a refusal (p11-kit's RPC client lists and carries only some)
        self._refused: dict[tuple[str, int], str] = {}  # (name, ckm) -> the token's answer
        self._table = {name: self._entry(name) for name in MECHANISMS}

    def _has(self, ckm: int | None, use: str, name: str = "") -> bool:
        return (
            ckm is not None
            and ckm in self.available
            and bool(self.available[ckm][2] & _FLAG[use])
            and (name, ckm) not in self._refused
        )

    def _entry(self, name: str) -> dict[str, Any]:
        spec = MECHANISMS[name]
        combined, raw = _candidates(name)
        uses = sorted(u for u in spec.uses if self._has(combined, u, name) or self._has(raw, u, name))
        via = combined if any(self._has(combined, u, name) for u in spec.uses) else raw if uses else None
        entry: dict[str, Any] = {
            "via": _ckm_name(via),
            "hash": None if via is None or spec.digest is None else "token" if via == combined else "host",
            "digest_via": _ckm_name(raw) if self._has(raw, "sign", name) else None,
            "uses": uses,
        }
        if via is not None:
            entry["key_sizes"] = list(self.available[via][:2])
        else:
            entry["needs"] = [n for n in (_ckm_name(combined), _ckm_name(raw)) if n]
        refused = {str(_ckm_name(c)): why for (n, c), why in self._refused.items() if n == name}
        if refused:
            entry["refused"] = refused
        return entry

    def table(self) -> dict[str, dict[str, Any]]:
        """Per name: ``via`` (the mechanism used), ``hash`` (``token``, ``host`` or None),
        ``digest_via`` (the raw mechanism for a pre-computed digest), ``uses``,
        ``key_sizes`` (the token's range) or ``needs`` (what the token would have to list),
        and ``refused`` (mechanisms it listed but refused when used, with its answer)."""
        return {name: dict(entry) for name, entry in self._table.items()}

    def token_text(self) -> str:
        t = self.token
        what = " ".join(x for x in (t.get("manufacturer"), t.get("model")) if x)
        return f"token {t.get('label', '?')!r}" + (f" ({what})" if what else "")

    def plan(self, name: str, use: str, *, digest: bool = False) -> Plan:
        """How to do ``name`` for ``use`` (``digest``: over a pre-computed digest).

        Raises:
            Refusal: ``mechanism_unsupported`` (kind ``user``), naming the token, the
                mechanism and the names the token offers for that use instead.
        """
        spec = MECHANISMS.get(name)
        if spec is None or use not in spec.uses:
            known = ", ".join(mechanisms_for(use))
            raise BadRequest(f"unknown mechanism {name!r} for {use} (known: {known})")
        combined, raw = _candidates(name)
        chosen: int | None
        prehash: str | None
        if digest:
            if raw is None:
                raise BadRequest(f"mechanism {name!r} cannot sign a pre-computed digest (ECDSA and RSA can)")
            chosen, prehash = (raw, None) if self._has(raw, use, name) else (None, None)
        elif self._has(combined, use, name):
            chosen, prehash = combined, None
        elif self._has(raw, use, name):
            chosen, prehash = raw, spec.digest
        else:
            chosen, prehash = None, None
        if chosen is None:
            raise self.unsupported(name, use, [raw] if digest else [combined, raw])
        low, high, _ = self.available[chosen]
        return Plan(name, chosen, prehash, low, high)

    def refused(self, plan: Plan, ckr: int, with_params: bool) -> bool:
        """The token refused ``plan``'s mechanism although it listed it (``CKR_MECHANISM_INVALID``,
        or, for a mechanism with parameters, ``CKR_MECHANISM_PARAM_INVALID`` or
        ``CKR_ARGUMENTS_BAD``): remember it for this session, so the next plan takes the
        other way if there is one. ``False`` if ``ckr`` is no such refusal."""
        if ckr != PyKCS11.CKR_MECHANISM_INVALID and not (with_params and ckr in _REFUSALS):
            return False
        self._refused[(plan.name, plan.ckm)] = str(PyKCS11.CKR.get(ckr, f"CKR_0x{ckr:X}"))
        self._table[plan.name] = self._entry(plan.name)
        return True

    def unsupported(self, name: str, use: str, needed: list[int | None]) -> Refusal:
        needs = " or ".join(n for n in map(_ckm_name, needed) if n)
        offers = [n for n in mechanisms_for(use) if use in self._table[n]["uses"]]
        verb = _VERBS[use]
        refused = self._table[name].get("refused")
        why = (
            f"it refused {', '.join(f'{m} ({r})' for m, r in refused.items())} although it lists "
            f"{'it' if len(refused) == 1 else 'them'}"
            if refused
            else f"it lists no {needs} with CKF_{use.upper()}"
        )
        return Refusal(
            "user",
            "mechanism_unsupported",
            f"{self.token_text()} does not offer {name!r} for {verb}: {why}{self.hint}; "
            f"what it offers for {verb} instead: {', '.join(offers) or 'nothing p11guard knows'}",
        )

    def check_generate(self, key_type: str, bits: int = 0) -> None:
        """Refuse to generate ``key_type`` (of ``bits``) when the token lists no mechanism for it."""
        ckm = GENERATE[_family(key_type)]
        if not self.available:
            return
        if ckm in self.available:
            low, high, _ = self.available[ckm]
            if not bits or not high or low <= bits <= high:
                return
            why = f"its {_ckm_name(ckm)} makes keys of {low} to {high} bits"
        else:
            why = f"it lists no {_ckm_name(ckm)}"
        can = [t for t in (*KEY_TYPES, *SECRET_TYPES) if GENERATE[_family(t)] in self.available]
        raise Refusal(
            "user",
            "mechanism_unsupported",
            f"{self.token_text()} cannot generate {key_type} keys: {why}; "
            f"it generates: {', '.join(can) or 'none of the types p11guard knows'}",
        )


def _family(key_type: str) -> str:
    return key_type if key_type == "ed25519" else key_type.split("-")[0]
