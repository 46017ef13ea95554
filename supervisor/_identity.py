"""Is this the group's token? A pure decision, recorded at first contact.

After the loss of a whole group the module may come back with *another* token of the same
label (another HSM, a re-initialised one): its handles would point to other objects and
its keys are not ours. The token's identity (label, serial, manufacturer, model) is what a
guard recorded at first contact, or what ``[group] serials`` pins ahead of time.
"""

from __future__ import annotations

from typing import Any

from p11guard.base import TokenMismatch
from p11guard.supervisor._states import Member

__all__ = ["IDENTITY_FIELDS", "token_mismatch"]

#: What identifies a token (``C_GetTokenInfo``).
IDENTITY_FIELDS = ("label", "serial", "manufacturer", "model")


def token_mismatch(member: Member, token: Any, serials: tuple[str, ...]) -> TokenMismatch | None:
    """``None`` if ``token`` is the member's token (recording it at first contact), else the
    error that keeps the member out. A module that says nothing of its token passes."""
    if not isinstance(token, dict) or not str(token.get("serial") or "").strip():
        # A module that names no serial cannot be checked -- nor one that answers a blank
        # serial now and then (SoftHSM2 did so once under load): never kept out for that.
        return None
    found = {k: token.get(k) for k in IDENTITY_FIELDS}
    if member.identity is None:
        if serials and found["serial"] not in serials:
            reason = f"token serial {found['serial']!r} is not one of group.serials {list(serials)}"
            return TokenMismatch(member.name, {"serial": list(serials)}, found, reason)
        member.identity = found
        return None
    expected = member.identity
    # A field answered blank is no evidence either way: SoftHSM2 reads its token file while
    # other processes use it, and once (16 workers logging in) answered our serial,
    # manufacturer and model with another label -- most likely read blank; the message did
    # not name the field then, it does now. A different token differs in a field it names.
    differ = [k for k in IDENTITY_FIELDS if _named(found[k]) and _named(expected[k]) and found[k] != expected[k]]
    if not differ:
        return None
    reason = (
        f"a different token answers: expected serial {expected['serial']!r} ({expected['manufacturer']} "
        f"{expected['model']}), found serial {found['serial']!r} ({found['manufacturer']} {found['model']})"
        + "".join(f"; {k} {expected[k]!r}, now {found[k]!r}" for k in differ if k != "serial")
        + "; kept out, never served"
    )
    return TokenMismatch(member.name, expected, found, reason)


def _named(value: Any) -> bool:
    return bool(str(value or "").strip())
