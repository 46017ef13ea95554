"""The p11guard exception hierarchy.

Foreign exceptions (``PyKCS11Error``, ``OSError``, ``EOFError``, msgpack errors) are
translated into these at exactly one boundary each: the host's op dispatcher (module
errors become error replies) and :class:`p11guard.host.HostProcess` (pipe and process
errors). Every exception carries the facts as attributes and reads well as a string.
No exception ever holds a PIN.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
    "ChannelPoisoned",
    "ConfigError",
    "GroupLossError",
    "GuardClosed",
    "GuardFailed",
    "GuardForked",
    "HostCrashed",
    "HostError",
    "HostStartError",
    "HostTimeout",
    "InternalError",
    "KeyChanged",
    "LabelAmbiguous",
    "LabelTaken",
    "MechanismUnsupported",
    "ModuleLoadError",
    "OpTimeout",
    "OutOfService",
    "OutcomeUnknown",
    "P11GuardError",
    "RemoteError",
    "RequestError",
    "SessionError",
    "StaleGeneration",
    "TokenMismatch",
    "UserError",
    "remote_error",
]


class P11GuardError(Exception):
    """Base class of every p11guard exception."""


class ConfigError(P11GuardError):
    """A configuration value is missing or invalid.

    Attributes:
        field: the dotted name of the field (``"group.pin_file"``), or ``None``.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self) -> tuple[Any, ...]:
        msg = str(self)
        if self.field and msg.startswith(f"{self.field}: "):
            msg = msg[len(self.field) + 2 :]
        return (type(self), (msg, self.field))


def _facts(**facts: object) -> str:
    return ", ".join(f"{k}={v}" for k, v in facts.items() if v is not None)


class RemoteError(P11GuardError):
    """The host answered a request with an error.

    Attributes:
        kind: the error class from :mod:`p11guard.protocol` (``group_loss``, ``session``,
            ``auth``, ``user``, ``bad_request``, ``stale_generation``, ``internal``).
        ckr: the PKCS#11 return code, or ``None`` when the error did not come from the module.
        name: ``CKR_*`` name, or a short error name such as ``key_not_found``.
        op: the operation that failed.
        pid: the host process id.
        generation: the generation of the host.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "internal",
        ckr: int | None = None,
        name: str | None = None,
        op: str | None = None,
        pid: int | None = None,
        generation: int | None = None,
    ) -> None:
        self.message = message
        self.kind = kind
        self.ckr = ckr
        self.name = name
        self.op = op
        self.pid = pid
        self.generation = generation
        super().__init__(message)

    def __str__(self) -> str:
        code = f"{self.name} (0x{self.ckr:X})" if self.ckr is not None else self.name
        head = f"{self.op}: " if self.op else ""
        facts = _facts(kind=self.kind, pid=self.pid, generation=self.generation)
        return f"{head}{code + ': ' if code else ''}{self.message} [{facts}]"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.__dict__))


def _rebuild(cls: type[Exception], message: str, state: dict[str, Any]) -> Exception:
    """Unpickle an exception whose ``__init__`` takes keyword facts: message, then the facts."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class GroupLossError(RemoteError):
    """A module error that signals the loss of the HSM group (CKR_DEVICE_ERROR and kin)."""


class SessionError(RemoteError):
    """The session or a handle is no longer valid (CKR_SESSION_HANDLE_INVALID and kin)."""


class AuthError(RemoteError):
    """Login failed for the PIN. Never retried: retries burn the token's retry counter."""


class UserError(RemoteError):
    """The request was wrong: bad arguments, wrong mechanism, key not found, bad data."""


class KeyChanged(UserError):
    """The key under a label is not the one this guard used: its fingerprint changed.

    Attributes:
        label: the key's label.
        expected: the fingerprint pinned at first use (``sha256:...``).
        found: the fingerprint found now.
    """

    def __init__(self, label: str, expected: str, found: str) -> None:
        super().__init__(
            f"key {label!r} is not the key this guard used: fingerprint {expected} was pinned at first use, "
            f"{found} is there now (changed outside this guard?). If the change is deliberate, "
            f"call Guard.refresh_keys([{label!r}])",
            kind="user",
            name="key_changed",
        )
        self.label, self.expected, self.found = label, expected, found


class LabelTaken(UserError):
    """Another process made a key of this label at the same moment; ours was destroyed."""


class LabelAmbiguous(UserError):
    """A label names more than one key of a class: refused for every operation."""


class MechanismUnsupported(UserError):
    """The token does not offer the mechanism (or refused it although it lists it): the
    message names the token, the mechanism and what the token offers instead."""


class RequestError(UserError):
    """The host could not understand the request (unknown op, wrong types, missing fields)."""


class StaleGeneration(RemoteError):
    """The request carried a generation that is not the host's: it was refused unrun."""


class InternalError(RemoteError):
    """Anything else the host or module reported."""


class ModuleLoadError(RemoteError):
    """The host could not load or initialise the PKCS#11 module (a configuration error)."""


_KIND_CLASSES: dict[str, type[RemoteError]] = {
    "group_loss": GroupLossError,
    "session": SessionError,
    "auth": AuthError,
    "user": UserError,
    "bad_request": RequestError,
    "stale_generation": StaleGeneration,
    "internal": InternalError,
    "config": ModuleLoadError,
}


_NAME_CLASSES: dict[str, type[RemoteError]] = {
    "label_taken": LabelTaken,
    "label_ambiguous": LabelAmbiguous,
    "mechanism_unsupported": MechanismUnsupported,
}


def remote_error(err: dict[str, Any], *, op: str | None, pid: int | None, generation: int | None) -> RemoteError:
    """Build the exception for an error reply ``{kind, ckr, name, message}``."""
    kind = str(err.get("kind", "internal"))
    cls = _NAME_CLASSES.get(str(err.get("name")), _KIND_CLASSES.get(kind, InternalError))
    ckr = err.get("ckr")
    return cls(
        str(err.get("message", "")),
        kind=kind,
        ckr=ckr if isinstance(ckr, int) else None,
        name=str(err["name"]) if err.get("name") is not None else None,
        op=op,
        pid=pid,
        generation=generation,
    )


class HostError(P11GuardError):
    """The host process failed as a process: it crashed, hung, or broke the channel.

    Attributes:
        pid: the host process id.
        generation: the generation the host belonged to.
        op: the operation in progress, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        generation: int | None = None,
        op: str | None = None,
    ) -> None:
        self.message = message
        self.pid = pid
        self.generation = generation
        self.op = op
        super().__init__(message)

    def __str__(self) -> str:
        facts = _facts(pid=self.pid, generation=self.generation, op=self.op)
        return f"{self.message} [{facts}]" if facts else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.__dict__))


class HostStartError(HostError):
    """The host process could not be started or did not come up."""


class HostCrashed(HostError):
    """The host process died.

    Attributes:
        exitcode: the exit status, negative for a signal (as in :mod:`subprocess`).
        signal_name: ``"SIGKILL"``, ``"SIGSEGV"``..., or ``None`` for a normal exit.
    """

    exitcode: int | None = None
    signal_name: str | None = None


class HostTimeout(HostError):
    """A call passed its deadline: the host is hung (the caller decides to kill it).

    Attributes:
        deadline_s: the deadline that passed, in seconds.
    """

    deadline_s: float = 0.0


class ChannelPoisoned(HostError):
    """A frame could not be read or decoded: the channel was closed, never resynced."""


class OutOfService(P11GuardError):
    """The group is not serving and the admission policy is ``fail_fast``."""

    def __init__(self, state: str, op: str | None = None) -> None:
        self.state = state
        self.op = op
        super().__init__(f"{op or 'operation'} refused: out of service (state {state})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.state, self.op))


class OutcomeUnknown(P11GuardError):
    """A token-changing operation was in flight when the group was lost.

    It may or may not have happened on the token; p11guard never retries it blindly.
    Check the token (``list_keys``) and decide.
    """

    def __init__(self, op: str, label: str | None, cause: str) -> None:
        self.op = op
        self.label = label
        self.cause = cause
        what = f"{op}({label!r})" if label else op
        super().__init__(f"outcome unknown: {what} was in flight when {cause}; not retried")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.op, self.label, self.cause))


class OpTimeout(P11GuardError):
    """An operation did not complete within its ``op_deadline_s``."""

    def __init__(self, op: str, deadline_s: float, state: str, last_error: str | None) -> None:
        self.op = op
        self.deadline_s = deadline_s
        self.state = state
        self.last_error = last_error
        tail = f"; last error: {last_error}" if last_error else ""
        super().__init__(f"{op} did not complete within op_deadline_s={deadline_s:g} s (state {state}){tail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.op, self.deadline_s, self.state, self.last_error))


class GuardFailed(P11GuardError):
    """The guard stopped for a reason that retrying cannot fix (wrong PIN, bad config)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"p11guard failed: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


class TokenMismatch(P11GuardError):
    """A token answered that is not the group's token: another serial (or maker, model).

    Kept out, never served, never logged in to again. Attributes: ``member``, ``expected``,
    ``found`` (dicts of label, serial, manufacturer, model; ``expected`` may list the
    serials of ``[group] serials``).
    """

    def __init__(self, member: str, expected: Any, found: dict[str, Any], reason: str | None = None) -> None:
        self.member, self.expected, self.found, self.reason = member, expected, found, reason
        super().__init__(
            f"member {member}: {reason or f'a different token answers: expected {expected}, found {found}'}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.member, self.expected, self.found, self.reason))


class GuardClosed(P11GuardError):
    """The guard is closed (or closing) and takes no more work."""


class GuardForked(P11GuardError):
    """The guard was created in another process: this one is a child of ``os.fork()``.

    A guard's threads and host processes belong to the process that created it; a forked
    child has copies of its objects but none of its threads, so it would wait forever.
    The child never touches the parent's hosts (the parent keeps serving).

    Attributes:
        parent_pid: the pid of the process that created the guard.
    """

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        super().__init__(
            f"this Guard was created in process {parent_pid} before os.fork(); a forked child cannot use it. "
            "Create the guard after the fork, in each child: gunicorn's post_fork(server, worker) hook, "
            "Celery's worker_process_init signal, or your own code after os.fork()"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.parent_pid,))
