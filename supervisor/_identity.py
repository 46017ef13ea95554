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
    if found == member.identity:
        return None
    expected = member.identity
    reason = (
        f"a different token answers: expected serial {expected['serial']!r} ({expected['manufacturer']} "
        f"{expected['model']}), found serial {found['serial']!r} ({found['manufacturer']} {found['model']}); "
        "kept out, never served"
    )
    return TokenMismatch(member.name, expected, found, reason)
