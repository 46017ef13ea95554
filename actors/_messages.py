"""Messages between the Supervisor, the CryptoWorkers and the HealthActor.

Every message that concerns a host carries the ``generation`` it belongs to: the
supervisor drops (or only settles the jobs of) anything from an older generation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from p11guard._secret import Secret
from p11guard.host import HostProcess

__all__ = [
    "HostRegistry",
    "Inject",
    "Job",
    "JobDone",
    "ProbeResult",
    "Renew",
    "Report",
    "RunJob",
    "Shutdown",
    "StartProbe",
    "WorkerFailed",
    "WorkerReady",
    "WorkerStopped",
]


@dataclass(eq=False)
class Job:
    """One accepted operation (or one batch frame) and the Future its caller waits on."""

    seq: int
    op: str
    args: dict[str, Any]
    future: Future[Any]
    deadline: float
    idempotent: bool
    label: str | None = None
    items: list[tuple[str, dict[str, Any]]] | None = None
    attempts: int = 0
    last_error: str | None = None

    @property
    def name(self) -> str:
        return f"batch of {len(self.items)} {self.items[0][0]}" if self.items else self.op


@dataclass(frozen=True)
class RunJob:
    job: Job


@dataclass(frozen=True)
class JobDone:
    wid: int
    generation: int
    job: Job
    result: Any = None
    error: BaseException | None = None
    settled: bool = False  # the worker already set the future's result


@dataclass(frozen=True)
class WorkerReady:
    wid: int
    generation: int
    pid: int
    sessions_opened: int


@dataclass(frozen=True)
class WorkerFailed:
    """A worker could not start or renew its host/session."""

    wid: int
    generation: int
    error: BaseException


@dataclass(frozen=True)
class WorkerStopped:
    wid: int
    generation: int


@dataclass(frozen=True)
class Renew:
    """one_for_one: the group is fine; renew this worker's session (or host)."""

    pin: Secret
    new_host: bool


@dataclass(frozen=True)
class Shutdown:
    """Close the session politely (the group answers), then stop."""

    deadline_s: float


@dataclass(frozen=True)
class Inject:
    """Fault injection on a worker's host (testing only)."""

    args: dict[str, Any]
    future: Future[Any]


@dataclass(frozen=True)
class Report:
    """A loss signal from a worker, for the HealthActor."""

    wid: int
    generation: int
    error: str


@dataclass(frozen=True)
class StartProbe:
    """Probe from a fresh probe host of ``generation`` (start-up and recovery)."""

    generation: int
    pin: Secret
    periodic: bool = False


@dataclass(frozen=True)
class ProbeResult:
    generation: int
    ok: bool
    at: float
    latency_s: float
    error: BaseException | None = None
    fresh: bool = False
    periodic: bool = False
    cause: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


class HostRegistry:
    """Every live host of a Guard, so that any thread can kill them (whole group, or all)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[str, HostProcess] = {}

    def add(self, key: str, host: HostProcess) -> None:
        with self._lock:
            self._hosts[key] = host

    def remove(self, key: str, host: HostProcess) -> None:
        with self._lock:
            if self._hosts.get(key) is host:
                del self._hosts[key]

    def get(self, key: str) -> HostProcess | None:
        with self._lock:
            return self._hosts.get(key)

    def hosts(self) -> list[HostProcess]:
        with self._lock:
            return list(self._hosts.values())

    def kill(self, hosts: Iterable[HostProcess] | None = None) -> None:
        """Kill the given hosts (default: all of them), process trees and all."""
        for host in list(hosts) if hosts is not None else self.hosts():
            host.kill()
