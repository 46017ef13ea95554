"""Effects: what the supervisor does to the world outside its books.

Starting actors, killing and booting hosts, sending itself a message later. The
supervisor does these only through this class, so the decision tests
(``tests/test_decisions.py``) can run every transition in-process, in milliseconds, with
a stand-in that records what would have happened.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import pykka

from p11guard.actors import CryptoWorker, FastLane, HealthActor, HostRegistry, KeyPins, worker_key
from p11guard.base import Config, Secret
from p11guard.host import HostProcess

__all__ = ["Effects"]


class Effects:
    """The real effects: pykka actors, host processes, :class:`threading.Timer`."""

    def __init__(self, registry: HostRegistry, lane: FastLane, pins: KeyPins | None = None) -> None:
        self.registry = registry
        self.lane = lane
        self.pins = pins if pins is not None else KeyPins()
        self._timers: list[threading.Timer] = []

    def start_health(
        self, name: str, config: Config, supervisor: pykka.ActorRef[Any], generation: Any, key: str
    ) -> pykka.ActorRef[Any]:
        """A HealthActor for member ``name``; ``generation()`` reads the member's generation."""
        return HealthActor.start(config, supervisor, self.registry, generation, member=name, key=key)

    def start_worker(
        self,
        wid: int,
        generation: int,
        config: Config,
        pin: Secret,
        supervisor: pykka.ActorRef[Any],
        given: HostProcess | None = None,
    ) -> pykka.ActorRef[Any]:
        """A CryptoWorker; ``given`` is a logged-in host it takes instead of starting one."""
        return CryptoWorker.start(wid, generation, config, pin, supervisor, self.registry, self.lane, given, self.pins)

    def worker_host(self, wid: int) -> HostProcess | None:
        return self.registry.get(worker_key(wid))

    def kill_worker_hosts(self, wids: Iterable[int]) -> None:
        """Kill these workers' hosts now: a call blocked in one then fails at once."""
        self.registry.kill(h for h in (self.worker_host(w) for w in wids) if h is not None)

    def kill_all_hosts(self) -> None:
        """Every host of the guard, probe hosts and spares too."""
        self.registry.kill()

    def prestart(self, env: Mapping[str, str], count: int) -> None:
        """Have ``count`` spare hosts booting for ``env`` (from the supervisor's thread)."""
        self.registry.prestart(env, count)

    def after(self, delay: float, ref: pykka.ActorRef[Any], message: Any) -> None:
        """Tell ``ref`` ``message`` in ``delay`` seconds (if it is still alive then)."""
        timer = threading.Timer(delay, lambda: ref.tell(message) if ref.is_alive() else None)
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()]
        self._timers.append(timer)
        timer.start()

    def cancel(self) -> None:
        """Cancel every pending :meth:`after`."""
        for timer in self._timers:
            timer.cancel()
