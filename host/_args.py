"""Request arguments and the host's own refusals, shared by every op module of the host."""

from __future__ import annotations

from typing import Any

__all__ = ["BadRequest", "Refusal", "arg"]


class BadRequest(Exception):
    """The request is malformed; the host answers with a ``bad_request`` error and goes on."""


class Refusal(Exception):
    """An error reply that did not come from the module (kind and name chosen by the host)."""

    def __init__(self, kind: str, name: str, message: str, ckr: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.ckr = ckr


def arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """``args[name]``, checked to be of ``kind`` (``bool`` is not an ``int`` here)."""
    value = args.get(name, default)
    if value is ...:
        raise BadRequest(f"missing argument {name!r}")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRequest(f"argument {name!r} must be {want}, not {type(value).__name__}")
    return value
