"""Fork safety: a guard belongs to the process that created it.

A forked child inherits a copy of every guard object but none of its threads (the
supervisor, the workers, the ticker), so a call would wait forever for an actor that does
not exist there; and the host processes and their pipes are the parent's. The hook below
counts the forks a process descends from; a guard remembers the count it was created
under and refuses (:class:`~p11guard.GuardForked`) once it differs. The check is one
integer comparison; nothing in the child touches the parent's hosts.

So that a guard *created* in the child after the fork works, the hook also forgets
p11guard's actors in pykka's registry (their threads are not in the child) and gives the
registry a new lock (a parent thread may have held it at the fork).
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["fork_epoch"]

_forks = 0


def _after_fork_in_child() -> None:
    global _forks
    _forks += 1
    pykka = sys.modules.get("pykka")
    registry = getattr(pykka, "ActorRegistry", None)
    refs = getattr(registry, "_actor_refs", None)
    if registry is not None and isinstance(refs, list):
        registry._actor_refs_lock = threading.RLock()
        refs[:] = [r for r in refs if not r.actor_class.__module__.startswith("p11guard.")]


os.register_at_fork(after_in_child=_after_fork_in_child)


def fork_epoch() -> int:
    """How many ``os.fork()`` calls this process descends from (since p11guard was imported)."""
    return _forks
