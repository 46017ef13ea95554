"""The module instance and the one logged-in session of a host."""

from __future__ import annotations

import os
import time
from typing import Any

import PyKCS11

from p11guard.host._args import Refusal, arg
from p11guard.host._ckr import ckr_kind
from p11guard.host._fastcall import FastSigner, handle_value
from p11guard.host._mechs import Negotiated, read_mechanisms

__all__ = ["Session", "jitter"]

_RW_SESSION = PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
# Start-up errors that SoftHSM2 (and p11-kit in front of it) answer spuriously when many
# processes read the token at the same instant. Retried a few times; a PIN error never.
_SPURIOUS = {PyKCS11.CKR_GENERAL_ERROR, PyKCS11.CKR_BUFFER_TOO_SMALL}
_START_ATTEMPTS = 5


def jitter(low: float, high: float) -> float:
    """A random delay in ``[low, high]`` (``os.urandom``: :mod:`random` costs a host ~1 MiB)."""
    return low + (high - low) * int.from_bytes(os.urandom(2), "big") / 0xFFFF


def _device_answers(session: Any, pin_error: PyKCS11.PyKCS11Error) -> None:
    """A PIN error is only believed if the device answers: some modules report a device
    that failed during login as a PIN error (tpm2-pkcs11: CKR_PIN_INCORRECT when the TPM
    cannot unseal). One call that needs no login tells; the login is never tried again."""
    try:
        session.generateRandom(8)
    except PyKCS11.PyKCS11Error as device_error:
        raise device_error from None
    raise pin_error


class Session:
    """``C_Initialize`` (:meth:`load`), then one session: find the token, open, log in once."""

    def __init__(self) -> None:
        self.lib: Any = None
        self.fast: FastSigner | None = None
        self.session: Any = None
        self.session_value = 0
        self.slot: Any = None
        self.token_label: str | None = None
        self.module_path = ""
        self.token_info: dict[str, str] = {}
        self.negotiated = Negotiated({}, {})
        self.login_attempts = 0
        self.sessions_opened = 0

    def load(self, module_path: str) -> None:
        """Load and initialise the module (``C_Initialize``)."""
        lib = PyKCS11.PyKCS11Lib()
        lib.load(module_path)
        self.lib = lib
        self.module_path = module_path
        try:
            self.fast = FastSigner(module_path)
        except (OSError, AttributeError):
            self.fast = None  # PyKCS11's path works for every module

    def require(self) -> Any:
        """The open session, or a ``session`` refusal."""
        if self.session is None:
            raise Refusal("session", "no_session", "no open session: send 'open' first")
        return self.session

    def _find_slot(self, token_label: str) -> Any:
        for attempt in range(1, _START_ATTEMPTS + 1):
            seen = []
            for slot in self.lib.getSlotList(tokenPresent=True):
                label = self.lib.getTokenInfo(slot).label.rstrip(" \x00")
                if label == token_label:
                    return slot
                seen.append(label)
            if "" not in seen:
                break
            # SoftHSM2 (also behind p11-kit) answered once without our token, "labels seen: ['']"
            # (its free slot, or our token read blank), while 6 processes logged in at once: a
            # listing with a blank label is looked at again (~0.3 s in all) before the answer.
            time.sleep(jitter(0.01, 0.05) * attempt)
        # No token at all is how a lost group looks; other tokens but not ours is a module
        # that answers without our token (a member of another group, a wrong label).
        raise Refusal(
            "group_loss",
            "token_label_unknown" if seen else "token_not_found",
            f"no token labelled {token_label!r}; labels seen: {seen or 'none'}",
            ckr=PyKCS11.CKR_TOKEN_NOT_PRESENT,
        )

    def op_open(self, args: dict[str, Any]) -> dict[str, Any]:
        token_label = arg(args, "token_label", str)
        pin = arg(args, "pin", str)
        # A renewal opens the new session before closing the old one: no logout/login churn
        # on the token (SoftHSM2 then answers other processes CKR_GENERAL_ERROR now and then).
        old, self.session = self.session, None
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
                    if exc.value == PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                        pass
                    elif ckr_kind(exc.value) == "auth":
                        _device_answers(session, exc)
                    else:
                        raise
                self.slot = slot  # token() reads it
                available, token = read_mechanisms(self.lib, slot), self.token()
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
                time.sleep(jitter(0.01, 0.05) * attempt)
        self.session, self.slot, self.token_label = session, slot, token_label
        self.session_value = handle_value(session.session)
        if self.fast is not None and not self.fast.shares_state(self.session_value):
            self.fast = None
        self.sessions_opened += 1
        hint = " (through p11-kit's RPC client, which lists and carries only the mechanisms it knows)"
        self.token_info = token
        self.negotiated = Negotiated(available, token, hint if "p11-kit" in self.module_path else "")
        return {
            "pid": os.getpid(),
            "sessions_opened": self.sessions_opened,
            "token": token,
            "mechanisms": self.negotiated.table(),
        }

    def renew(self) -> None:
        """A fresh session on the same slot in place of the open one, whose operation state
        is stuck (``CKR_OPERATION_ACTIVE``). No login: the login state is the application's,
        so the new session is logged in while the old one still is; then the old one closes."""
        old = self.require()
        new = self.lib.openSession(self.slot, _RW_SESSION)
        self.session, self.session_value = new, handle_value(new.session)
        self.sessions_opened += 1
        try:
            old.closeSession()
        except PyKCS11.PyKCS11Error:
            pass

    def token(self) -> dict[str, str]:
        """The token's identity: label, serial, manufacturer, model (as ``C_GetTokenInfo`` says)."""
        info = self.lib.getTokenInfo(self.slot)
        return {
            "label": info.label.rstrip(" \x00"),
            "serial": info.serialNumber.strip(" \x00"),
            "manufacturer": info.manufacturerID.strip(" \x00"),
            "model": info.model.strip(" \x00"),
        }

    def drop(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            try:
                session.closeSession()
            except PyKCS11.PyKCS11Error:
                pass

    def op_close(self, args: dict[str, Any]) -> bool:
        if self.session is not None:
            try:
                self.session.logout()
            except PyKCS11.PyKCS11Error:
                pass
        self.drop()
        return True

    def op_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        """Liveness and counters; works without a session."""
        return {
            "pid": os.getpid(),
            "login_attempts": self.login_attempts,
            "sessions_opened": self.sessions_opened,
            "session": self.session is not None,
        }

    def op_probe(self, args: dict[str, Any]) -> dict[str, Any]:
        start = time.monotonic()
        token = self.token()
        self.require().generateRandom(16)
        return {
            "token": token,
            "token_label": token["label"],
            "serial": token["serial"],
            "latency_s": time.monotonic() - start,
            "login_attempts": self.login_attempts,
            "sessions_opened": self.sessions_opened,
        }
