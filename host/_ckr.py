"""CKR code -> error kind: the one place p11guard classifies PKCS#11 return codes.

It lives in the host, beside the only code that imports PyKCS11; the parent sees kinds
(:mod:`p11guard.protocol`), never raw codes to classify.
"""

from __future__ import annotations

import PyKCS11

__all__ = ["ckr_kind", "ckr_name"]

# The loss signals of Luna's documented procedure, plus their kin: the module or the
# whole group is gone, and only C_Finalize + C_Initialize (a fresh host) can help.
_GROUP_LOSS = {
    PyKCS11.CKR_DEVICE_ERROR,  # 0x30
    PyKCS11.CKR_DEVICE_REMOVED,  # 0x32
    PyKCS11.CKR_TOKEN_NOT_PRESENT,  # 0xE0
    PyKCS11.CKR_TOKEN_NOT_RECOGNIZED,  # 0xE1
    PyKCS11.CKR_CRYPTOKI_NOT_INITIALIZED,  # 0x190
}
# The session or a handle went away: a new session (and fresh handles) may be enough.
_SESSION = {
    PyKCS11.CKR_SESSION_HANDLE_INVALID,  # 0xB3
    PyKCS11.CKR_SESSION_CLOSED,  # 0xB0
    PyKCS11.CKR_USER_NOT_LOGGED_IN,  # 0x101
    PyKCS11.CKR_OBJECT_HANDLE_INVALID,  # 0x82
    PyKCS11.CKR_KEY_HANDLE_INVALID,  # 0x60
}
_INTERNAL = {
    PyKCS11.CKR_GENERAL_ERROR,
    PyKCS11.CKR_HOST_MEMORY,
    PyKCS11.CKR_FUNCTION_FAILED,
    PyKCS11.CKR_CANCEL,
}


def ckr_name(ckr: int) -> str:
    """The ``CKR_*`` name of a code, from PyKCS11's own table."""
    name = PyKCS11.CKR.get(ckr)
    return str(name) if isinstance(name, str) else f"CKR_0x{ckr:X}"


def ckr_kind(ckr: int) -> str:
    """The error kind of a PKCS#11 return code.

    Returns:
        ``group_loss``, ``session``, ``auth`` (every ``CKR_PIN_*``), ``internal``, or ``user``
        (everything the caller can fix: arguments, mechanism, key, data, signature...).
    """
    if ckr in _GROUP_LOSS:
        return "group_loss"
    if ckr in _SESSION:
        return "session"
    if ckr_name(ckr).startswith("CKR_PIN_"):
        return "auth"
    if ckr in _INTERNAL or ckr < 0:
        return "internal"
    return "user"
