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
from typing import Any

from p11guard.actors._messages import Job
from p11guard.base import KeyChanged, RemoteError
from p11guard.host import HostProcess
from p11guard.protocol import ANSWER_KINDS, KEY_OPS

__all__ = ["KeyPins", "check_keys", "repin"]


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


def check_keys(host: HostProcess, job: Job, pins: KeyPins | None, deadline_s: float) -> None:
    """Each key of ``job``, once per session of ``host``: is it still the key this guard used?

    Raises:
        KeyChanged: a key's fingerprint is not the one pinned.
        RemoteError, HostError: the check itself failed (a signal, for the supervisor).
    """
    if pins is None:
        return
    items = job.items if job.items is not None else [(job.op, job.args)]
    for op, args in items:
        label = args.get("key")
        if op not in KEY_OPS or not isinstance(label, str):
            continue
        version = pins.version(label)
        if host.checked_keys.get(label) == version:
            continue
        try:
            info = host.call("key_fingerprint", {"key": label}, deadline_s)
        except RemoteError as exc:
            if exc.kind in ANSWER_KINDS:
                continue  # no such key (yet): the operation itself gives the answer
            raise
        expected = pins.check(label, str(info["fingerprint"]))
        if expected is not None:
            raise KeyChanged(label, expected, str(info["fingerprint"]))
        host.checked_keys[label] = version


def repin(pins: KeyPins | None, job: Job, result: Any) -> None:
    """Keys made or destroyed through this guard re-pin themselves."""
    if pins is None or job.items is not None:
        return
    label = job.args.get("label")
    if job.op in ("generate_key_pair", "generate_secret") and isinstance(result, dict):
        if isinstance(label, str) and result.get("fingerprint"):
            pins.repin(label, str(result["fingerprint"]))
    elif job.op == "destroy" and isinstance(label, str):
        pins.forget([label])
