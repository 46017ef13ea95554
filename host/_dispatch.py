"""The host's one boundary: a decoded request in, a reply map out; never raises.

Every ``PyKCS11Error`` (and anything else an op raises) becomes an error reply here and
nowhere else: ``{kind, ckr, name, message}``, the kind from :func:`ckr_kind`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import PyKCS11

from p11guard.host._args import BadRequest, Refusal, arg
from p11guard.host._cipher import Cipher
from p11guard.host._ckr import ckr_kind, ckr_name
from p11guard.host._crypto import Crypto
from p11guard.host._faults import Faults
from p11guard.host._keygen import KeyMaker
from p11guard.host._keys import Keys
from p11guard.host._session import Session
from p11guard.protocol import IDEMPOTENT_OPS, OPS

__all__ = ["Host"]

_EXPLAIN = {
    "group_loss": "the HSM group (or device) is lost",
    "session": "the session or a handle is no longer valid",
    "auth": "login refused for the PIN",
    "user": "the module refused the request",
    "internal": "the module failed",
}
#: Ops that need no open session.
_SESSIONLESS = frozenset({"open", "ping", "fault", "close"})
#: Ops a batch may not carry.
_NOT_IN_BATCH = frozenset({"batch", "open", "close", "fault"})


class Host:
    """The module, its session, its keys and its fault plan, in one process, one thread."""

    def __init__(self, *, generation: int, fault_injection: bool) -> None:
        self.generation = generation
        self.session = Session()
        self.keys = Keys(self.session)
        self.maker = KeyMaker(self.keys)
        self.crypto = Crypto(self.session, self.keys)
        self.cipher = Cipher(self.session, self.keys, self.maker)
        self.faults = Faults(fault_injection, self.crypto.leave_active)
        self.renewals = 0
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "open": self.op_open,
            "probe": self.session.op_probe,
            "ping": self.op_ping,
            "close": self.op_close,
            "mechanisms": self.op_mechanisms,
            "sign": self.crypto.op_sign,
            "sign_digest": self.crypto.op_sign_digest,
            "verify": self.crypto.op_verify,
            "encrypt": self.cipher.op_encrypt,
            "decrypt": self.cipher.op_decrypt,
            "wrap": self.cipher.op_wrap,
            "unwrap": self.cipher.op_unwrap,
            "derive": self.cipher.op_derive,
            "digest": self.crypto.op_digest,
            "random": self.crypto.op_random,
            "public_key": self.keys.op_public_key,
            "key_info": self.keys.op_key_info,
            "generate_key_pair": self.maker.op_generate_key_pair,
            "generate_secret": self.maker.op_generate_secret,
            "destroy": self.keys.op_destroy,
            "list_keys": self.keys.op_list_keys,
            "key_fingerprint": self.keys.op_key_fingerprint,
            "fault": self.faults.op_fault,
        }

    @property
    def serving(self) -> bool:
        """Whether a session is open (a host that loses its pipe then exits as poisoned)."""
        return self.session.session is not None

    def load(self, module_path: str) -> None:
        """Load and initialise the module (``C_Initialize``)."""
        self.session.load(module_path)

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
                raise Refusal(
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
        """Each item runs on its own: one failing item never fails the others."""
        out: list[dict[str, Any]] = []
        for item in arg(args, "items", list):
            try:
                if not isinstance(item, dict):
                    raise BadRequest("batch item is not a map")
                op = item.get("op")
                if op in _NOT_IN_BATCH:
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
            raise BadRequest(f"unknown op {op!r} (known: {', '.join(sorted(OPS))})")
        if op != "fault":
            self.faults.apply(op)
        if op in _SESSIONLESS:
            return handler(args)
        self.session.require()
        try:
            return handler(args)
        except PyKCS11.PyKCS11Error as exc:
            if exc.value != PyKCS11.CKR_OPERATION_ACTIVE:
                raise
        # An operation of the session was left active (a multi-part call that failed half
        # way, a module that kept its state): renew the session -- not a loss, no probe --
        # and run the op again once if it changes nothing on the token.
        self.renew_session()
        if op not in IDEMPOTENT_OPS:
            raise Refusal(
                "user",
                "operation_active",
                f"{op}: the session had an operation left active (CKR_OPERATION_ACTIVE); the session was "
                "renewed, the operation not run again because it changes the token: check whether it took "
                "effect, then run it again",
                ckr=PyKCS11.CKR_OPERATION_ACTIVE,
            )
        return handler(args)

    def renew_session(self) -> None:
        """A new session in place of one whose operation state is stuck; handles found again."""
        self.session.renew()
        self.keys.clear()
        self.renewals += 1

    @staticmethod
    def error_reply(exc: BaseException) -> dict[str, Any]:
        if isinstance(exc, PyKCS11.PyKCS11Error):
            code = int(exc.value)
            if code < 0:  # PyKCS11's own: -1 load failure, -2 template, -3 byte list
                return {"kind": "internal", "ckr": None, "name": "pykcs11", "message": str(exc)}
            kind = ckr_kind(code)
            return {"kind": kind, "ckr": code, "name": ckr_name(code), "message": _EXPLAIN[kind]}
        if isinstance(exc, Refusal):
            return {"kind": exc.kind, "ckr": exc.ckr, "name": exc.name, "message": str(exc)}
        if isinstance(exc, BadRequest):
            return {"kind": "bad_request", "ckr": None, "name": "bad_request", "message": str(exc)}
        return {"kind": "internal", "ckr": None, "name": type(exc).__name__, "message": str(exc) or type(exc).__name__}

    # -- session ops that touch more than the session ----------------------------------

    def op_open(self, args: dict[str, Any]) -> dict[str, Any]:
        self.keys.clear()  # handles belong to the session they were found in
        return {**self.session.op_open(args), "generation": self.generation}

    def op_close(self, args: dict[str, Any]) -> bool:
        self.keys.clear()
        return self.session.op_close(args)

    def op_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {**self.session.op_ping(args), "generation": self.generation, "renewals": self.renewals}

    def op_mechanisms(self, args: dict[str, Any]) -> dict[str, Any]:
        """The mechanism table negotiated at session open (see :mod:`._mechs`), with the token."""
        return {"pid": os.getpid(), "token": self.session.token_info, "mechanisms": self.session.negotiated.table()}
