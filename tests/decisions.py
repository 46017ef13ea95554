"""An in-process stand-in for the supervisor's effects, for the decision tests.

No process, no actor thread, no PKCS#11: the Supervisor's decisions run on the test's
thread, message by message, and every effect (an actor started, hosts killed, a message
scheduled) is recorded for the test to assert on.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p11guard import Config, Secret
from p11guard.actors import FastLane, Job, KeyPins, ProbeResult, WorkerReady
from p11guard.supervisor import SharedState, Supervisor


class RecordingRef:
    """Stands in for a pykka ActorRef: keeps what it was told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.told: list[Any] = []
        self.stopped = False

    def tell(self, message: Any) -> None:
        self.told.append(message)

    def stop(self, block: bool = True, timeout: float | None = None) -> None:
        self.stopped = True

    def is_alive(self) -> bool:
        return not self.stopped

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.told if isinstance(m, kind)]


@dataclass
class FakeHost:
    pid: int
    alive: bool = True
    exitcode: int | None = None


@dataclass
class Worker:
    wid: int
    generation: int
    member: str
    ref: RecordingRef
    given: Any = None


@dataclass
class RecordingEffects:
    lane: FastLane = field(default_factory=FastLane)
    pins: KeyPins = field(default_factory=KeyPins)
    health: dict[str, RecordingRef] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    scheduled: list[tuple[float, Any]] = field(default_factory=list)
    kills: list[str] = field(default_factory=list)
    prestarts: int = 0
    hosts: dict[int, FakeHost] = field(default_factory=dict)

    def start_health(self, name: str, config: Config, supervisor: Any, generation: Any, key: str) -> RecordingRef:
        self.health[name] = RecordingRef(key)
        return self.health[name]

    def start_worker(
        self, wid: int, generation: int, config: Config, pin: Secret, supervisor: Any, given: Any = None
    ) -> RecordingRef:
        ref = RecordingRef(f"worker-{wid}")
        member = next((n for n, c in self.member_configs.items() if c is config), "default")
        self.workers.append(Worker(wid, generation, member, ref, given))
        self.hosts[wid] = FakeHost(1000 + len(self.workers))
        return ref

    def worker_host(self, wid: int) -> FakeHost | None:
        return self.hosts.get(wid)

    def kill_worker_hosts(self, wids: Any) -> None:
        for wid in wids:
            self.kills.append(f"worker-{wid}")
            if wid in self.hosts:
                self.hosts[wid].alive = False

    def kill_all_hosts(self) -> None:
        self.kills.append("all")

    def prestart(self, env: Mapping[str, str], count: int) -> None:
        self.prestarts += count

    def after(self, delay: float, ref: Any, message: Any) -> None:
        self.scheduled.append((delay, message))

    def cancel(self) -> None:
        self.scheduled.clear()

    member_configs: dict[str, Config] = field(default_factory=dict)


def make_config(tmp_path: Path, members: int = 0, **changes: Any) -> Config:
    module = tmp_path / "module.so"
    module.write_bytes(b"")
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    data: dict[str, Any] = {
        "module": {"path": str(module)},
        "group": {"token_label": "t", "pin_file": str(pin)},
        "workers": {"count": 2},
    }
    if members:
        data["group"]["members"] = [{"name": f"m{i}"} for i in range(members)]
    return Config.from_dict(data).replace(**changes)


class Rig:
    """A Supervisor driven by hand, with recorded effects."""

    def __init__(self, config: Config) -> None:
        self.effects = RecordingEffects()
        self.started: Future[None] = Future()
        self.shared = SharedState()
        self.sup = Supervisor(config, self.started, self.shared, self.effects)  # type: ignore[arg-type]
        self.effects.member_configs = {m.name: m.config for m in self.sup.members.values()}
        self._seq = itertools.count(1)
        self.sup.on_start()

    def send(self, message: Any) -> Any:
        return self.sup.on_receive(message)

    def probe(self, member: str = "default", ok: bool = True, error: BaseException | None = None, **kw: Any) -> None:
        m = self.sup.members[member]
        fresh = kw.pop("fresh", True)
        self.send(
            ProbeResult(
                m.generation,
                ok,
                time.time(),
                0.001,
                error,
                fresh=fresh,
                member=member,
                cause=kw.pop("cause", None),
                started=time.monotonic(),
                host_loaded_at=kw.pop("host_loaded_at", 0.0),
            )
        )

    def ready(self, workers: list[Worker] | None = None) -> None:
        for w in workers if workers is not None else self.effects.workers:
            self.send(WorkerReady(w.wid, w.generation, 1000 + w.wid, 1))

    def serve(self) -> None:
        """First probe answers, every worker comes up: SERVING."""
        for name in self.sup.members:
            self.probe(name)
        self.ready()

    def job(self, op: str = "sign", idempotent: bool = True, deadline_s: float = 60.0) -> Job:
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        return Job(next(self._seq), op, {}, future, time.monotonic() + deadline_s, idempotent, label="k")

    def current(self) -> list[Worker]:
        return [w for w in self.effects.workers if w.wid in self.sup.slots and w.generation == self.sup.generation]
