"""A direct path to ``C_SignInit`` + ``C_Sign`` through the module's own function list.

PyKCS11 returns signatures as a SWIG byte vector that costs ~1 us per byte to turn into
``bytes`` (60 us for an ECDSA signature, more than the pipe round trip). Signing is the
hot path, so the host calls those two functions through ctypes on the same, already
initialised module instance (``dlopen`` of the same path returns the same handle), with
the buffer sized from the key: two module calls, one copy. Mechanisms with parameters
(RSA-PSS), and modules that hand out a fresh instance per ``C_GetFunctionList``
(p11-kit-client), keep using PyKCS11 -- with the vector read at once (:func:`vector_bytes`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import PyKCS11

__all__ = ["FastSigner", "handle_value", "vector_bytes"]

# CK_FUNCTION_LIST, in the order of the PKCS#11 v2.x header, up to C_Sign.
_NAMES = [
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
    "C_CreateObject",
    "C_CopyObject",
    "C_DestroyObject",
    "C_GetObjectSize",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_EncryptInit",
    "C_Encrypt",
    "C_EncryptUpdate",
    "C_EncryptFinal",
    "C_DecryptInit",
    "C_Decrypt",
    "C_DecryptUpdate",
    "C_DecryptFinal",
    "C_DigestInit",
    "C_Digest",
    "C_DigestUpdate",
    "C_DigestKey",
    "C_DigestFinal",
    "C_SignInit",
    "C_Sign",
]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _FunctionList(ctypes.Structure):
    _fields_ = [("version", _Version)] + [(name, ctypes.c_void_p) for name in _NAMES]


class _SessionInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulong) for name in ("slotID", "state", "flags", "ulDeviceError")]


class _Mechanism(ctypes.Structure):
    _fields_ = [
        ("mechanism", ctypes.c_ulong),
        ("pParameter", ctypes.c_void_p),
        ("ulParameterLen", ctypes.c_ulong),
    ]


_SignInit = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_Mechanism), ctypes.c_ulong)
_Sign = ctypes.CFUNCTYPE(
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_ulong),
)


class FastSigner:
    """``sign(session, mechanism, key, data, size) -> (rv, signature)`` without PyKCS11."""

    def __init__(self, module_path: str) -> None:
        lib = ctypes.CDLL(module_path)
        pointer = ctypes.POINTER(_FunctionList)()
        get = lib.C_GetFunctionList
        get.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
        get.restype = ctypes.c_ulong
        rv = get(ctypes.byref(pointer))
        if rv != 0 or not pointer:
            raise OSError(f"C_GetFunctionList failed (0x{rv:x})")
        functions = pointer.contents
        if not functions.C_SignInit or not functions.C_Sign:
            raise OSError("the module has no C_SignInit/C_Sign")
        self._lib = lib  # keep the handle
        self._session_info = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_SessionInfo))(
            functions.C_GetSessionInfo
        )
        self._sign_init = _SignInit(functions.C_SignInit)
        self._sign = _Sign(functions.C_Sign)
        self._mechs: dict[int, _Mechanism] = {}

    def shares_state(self, session: int) -> bool:
        """Whether this function list is the instance PyKCS11 initialised: some modules
        (p11-kit-client) hand out a fresh, uninitialised instance per C_GetFunctionList."""
        info = _SessionInfo()
        return int(self._session_info(session, ctypes.byref(info))) == 0

    def sign(self, session: int, mechanism: int, key: int, data: bytes, size: int) -> tuple[int, bytes]:
        mech = self._mechs.get(mechanism)
        if mech is None:
            mech = self._mechs[mechanism] = _Mechanism(mechanism, None, 0)
        rv = int(self._sign_init(session, ctypes.byref(mech), key))
        if rv:
            return rv, b""
        out = ctypes.create_string_buffer(size)
        length = ctypes.c_ulong(size)
        rv = int(self._sign(session, data, len(data), out, ctypes.byref(length)))
        return rv, out.raw[: length.value] if not rv else b""


_POINTERS = ctypes.c_void_p * 2
_MAX_VECTOR = 1 << 30  # a layout read wrong gives a wild length: never read that far


def _read_vector(vector: Any) -> bytes:
    # A SWIG object's ``this`` is the address of its C++ object; a std::vector begins
    # with its ``begin`` and ``end`` pointers in every C++ standard library we know of.
    begin, end = _POINTERS.from_address(int(vector.this))
    if not begin or not end:
        return b""
    if not 0 <= end - begin <= _MAX_VECTOR:
        raise ValueError(f"not a std::vector layout: {end - begin} bytes")
    return ctypes.string_at(begin, end - begin)


def _vector_reader() -> Callable[[Any], bytes]:
    """Read a PyKCS11 byte vector's memory at once, if a known value reads back right;
    else ``bytes()``, which converts it item by item (~0.7 us a byte: 45 us a signature)."""
    try:
        if all(_read_vector(PyKCS11.ckbytelist(v)) == v for v in (bytes(range(7)), b"\xff" * 300, b"")):
            return _read_vector
    except Exception:  # any surprise means: not this layout, use bytes()
        pass
    return bytes


#: ``bytes`` of a PyKCS11 ``ckbytelist`` (a module's output buffer).
vector_bytes = _vector_reader()


def handle_value(handle: Any) -> int:
    """The integer behind a PyKCS11 handle object."""
    return int(handle.value()) if hasattr(handle, "value") else int(handle)
