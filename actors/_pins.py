"""KeyPins: the fingerprint of every key a guard has used, by label.

A key is pinned the first time a worker meets its label, and every worker checks the
label again on each new session (a new host, a recovery, a renewal): after the loss of a
whole group, handles may point to a *different* object, and a server may come back with
another token of the same label. A key whose fingerprint changed is refused
(:class:`~p11guard.KeyChanged`) until the caller says the change is deliberate
(``Guard.refresh_keys``). Keys made or destroyed through the guard re-pin themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

__all__ = ["KeyPins"]


class KeyPins:
    """Label -> fingerprint, shared by every worker of a guard; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pins: dict[str, str] = {}
        self._versions: dict[str, int] = {}
        self._next = 1

    def version(self, label: str) -> int:
        """Changes whenever the label is re-pinned or forgotten: a worker re-checks then."""
        return self._versions.get(label, 0)

    def check(self, label: str, fingerprint: str) -> str | None:
        """Pin ``fingerprint`` if ``label`` has none; the pinned one if it differs, else None."""
        with self._lock:
            pinned = self._pins.setdefault(label, fingerprint)
            return None if pinned == fingerprint else pinned

    def get(self, label: str) -> str | None:
        return self._pins.get(label)

    def repin(self, label: str, fingerprint: str) -> None:
        """The key was made through this guard: this is the key now."""
        with self._lock:
            self._pins[label] = fingerprint
            self._bump(label)

    def forget(self, labels: Iterable[str] | None = None) -> None:
        """Forget some labels (all with None): re-pinned at their next use."""
        with self._lock:
            for label in list(self._pins) if labels is None else list(labels):
                self._pins.pop(label, None)
                self._bump(label)

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self._pins)

    def _bump(self, label: str) -> None:
        self._versions[label] = self._next
        self._next += 1
