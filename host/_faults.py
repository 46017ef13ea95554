"""Fault injection inside a host (``testing.fault_injection = true`` only)."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from typing import Any

import PyKCS11

from p11guard.host._args import BadRequest, Refusal, arg

__all__ = ["Faults"]


class Faults:
    """A plan of faults: the next calls fail with a CKR code, hang, or the host crashes;
    or an operation is left active in the session (``leave_active``: ``C_SignInit``
    without ``C_Sign``, as a multi-part call that failed half way leaves it)."""

    def __init__(self, enabled: bool, leave_active: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.enabled = enabled
        self._leave_active = leave_active
        self._fail_plan: list[tuple[int, int, frozenset[str] | None]] = []  # [ckr, count, ops]
        self._hang_next = 0.0

    def apply(self, op: str) -> None:
        """Before ``op`` runs: hang if planned, raise a planned module error."""
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
        if not self.enabled:
            raise Refusal(
                "bad_request",
                "fault_injection_disabled",
                "fault injection is disabled for this host (testing.fault_injection = false)",
            )
        action = arg(args, "action", str)
        if action == "fail_next":
            ops = args.get("ops")
            if ops is not None and not (isinstance(ops, list) and all(isinstance(o, str) for o in ops)):
                raise BadRequest("argument 'ops' must be a list of op names")
            self._fail_plan.append((arg(args, "ckr", int), arg(args, "count", int, 1), frozenset(ops) if ops else None))
            return True
        if action == "hang":
            self._hang_next = float(arg(args, "seconds", (int, float)))
            return True
        if action == "crash":
            how = arg(args, "how", str, "exit")
            if how == "exit":
                os._exit(13)
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "segv":
                ctypes.string_at(0)
            raise BadRequest(f"unknown crash {how!r} (exit, sigkill, segv)")
        if action == "leave_active" and self._leave_active is not None:
            return self._leave_active(args)
        if action == "say":
            # Output as a chatty module makes it (tpm2-pkcs11 in an outage): to stderr, by lines.
            lines = arg(args, "lines", int, 1)
            text = arg(args, "text", str, "module says")
            for i in range(lines):
                os.write(2, f"{text} {i}\n".encode())
            return True
        raise BadRequest(f"unknown fault action {action!r} (fail_next, hang, crash, say, leave_active)")
