"""A PIN wrapper that never shows its value."""

from __future__ import annotations

from typing import Any

__all__ = ["Secret"]


class Secret:
    """Holds a PIN. ``repr``/``str`` show stars; only :meth:`reveal` gives the value.

    The value is revealed at exactly one place: when the ``open`` request for a host is
    built. It is never logged, never put in argv or a child's environment, never pickled.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The PIN itself. Call only to hand it to the module."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a Secret cannot be pickled")
