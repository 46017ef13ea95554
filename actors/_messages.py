"""Messages between the Supervisor, the CryptoWorkers and the HealthActor.

Every message that concerns a host carries the ``generation`` it belongs to: the
supervisor drops (or only settles the jobs of) anything from an older generation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from p11guard.base import Secret
from p11guard.host import HostProcess

__all__ = [
    "FastLane",
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
    "Ticket",
    "WorkerFailed",
    "WorkerReady",
    "WorkerStopped",
    "worker_key",
]


def worker_key(wid: int) -> str:
    """The registry key (and host name) of worker ``wid``'s host."""
    return f"worker-{wid}"


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
    #: Times a probe said the group was fine after this job met a loss signal: the
    #: signal was the job's own. Once retried on another worker, the next is its answer.
    cleared: int = 0
    #: ``time.monotonic()`` when the caller submitted it (for latency metrics).
    submitted: float = 0.0

    @property
    def name(self) -> str:
        return f"batch of {len(self.items)} {self.items[0][0]}" if self.items else self.op


@dataclass(frozen=True)
class RunJob:
    """Run ``job`` -- and, coalesced into the same frame, the single operations ``more``."""

    job: Job
    more: tuple[Job, ...] = ()


@dataclass(frozen=True)
class JobDone:
    wid: int
    generation: int
    job: Job
    result: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class WorkerReady:
    wid: int
    generation: int
    pid: int
    sessions_opened: int
    #: The token the worker logged in to (label, serial, manufacturer, model).
    token: dict[str, Any] = field(default_factory=dict)
    #: The mechanisms its session negotiated with the token (name -> choice).
    mechanisms: dict[str, Any] = field(default_factory=dict)
    #: When its host loaded the module (:attr:`HostProcess.loaded_at`).
    host_loaded_at: float = 0.0


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
    """Probe from a fresh probe host (start-up and recovery).

    ``generation`` is the member's (for the health actor's books); ``host_generation`` the
    group's, which the host is tagged with. With ``handover`` a probe that succeeds gives
    its host -- loaded, logged in -- to the supervisor for a worker: a member that answers
    again serves one connection and login sooner.
    """

    generation: int
    pin: Secret
    host_generation: int = 0
    handover: bool = False


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
    member: str = "default"
    host: HostProcess | None = None
    #: When the probe began (``time.monotonic()``): a verdict covers the signals before it.
    started: float = 0.0
    #: When the probe's host loaded the module: an OK covers connections no older than it.
    #: Every non-fresh probe sets it (``HealthActor._probe``); 0.0 would vouch for all.
    host_loaded_at: float = 0.0


@dataclass(frozen=True)
class Ticket:
    """A free worker's host, lent to a caller's thread for one job (the direct path)."""

    wid: int
    generation: int
    host: HostProcess
    call_s: float


class FastLane:
    """The hot path into the supervisor, without a thread hop.

    Submitting a job and delivering a successful result are plain method calls under the
    supervisor's lock (which its actor also holds while it handles any message), so a
    single operation costs two thread hand-offs (caller -> worker -> caller), not four --
    and none on the direct path, where a blocking caller runs its job on a free worker's
    host itself (:meth:`submit_direct`). Everything else -- failures, probes, recovery,
    timers -- stays an actor message.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._submit: Callable[[Job], None] | None = None
        self._deliver: Callable[[JobDone], None] | None = None
        self._direct: Callable[[Job], Ticket | None] | None = None

    def connect(
        self,
        submit: Callable[[Job], None],
        deliver: Callable[[JobDone], None],
        direct: Callable[[Job], Ticket | None] | None = None,
    ) -> None:
        with self.lock:
            self._submit, self._deliver, self._direct = submit, deliver, direct

    def disconnect(self) -> None:
        with self.lock:
            self._submit = self._deliver = self._direct = None

    def submit_direct(self, job: Job) -> Ticket | bool | None:
        """Hand ``job`` to the supervisor: a :class:`Ticket` when a worker is free and nothing
        waits (the caller runs the job), ``None`` when it was queued or answered, ``False``
        when the supervisor is not running."""
        with self.lock:
            if self._direct is None:
                if self._submit is None:
                    return False
                self._submit(job)
                return None
            return self._direct(job)

    def submit(self, job: Job) -> bool:
        """Hand ``job`` to the supervisor now; ``False`` if it is not running."""
        with self.lock:
            if self._submit is None:
                return False
            self._submit(job)
            return True

    def deliver(self, done: JobDone) -> bool:
        """Hand a finished job to the supervisor now; ``False`` if it is not running."""
        return self.deliver_all((done,))

    def deliver_all(self, dones: Sequence[JobDone]) -> bool:
        """Hand finished jobs to the supervisor at once, under one lock; ``False`` if it is
        not running (then nothing was delivered)."""
        with self.lock:
            if self._deliver is None:
                return False
            for done in dones:
                self._deliver(done)
            return True


class HostRegistry:
    """Every live host of a Guard, so that any thread can kill them (whole group, or all),
    and the spare hosts started ahead of need for each environment (member)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[str, HostProcess] = {}
        self._spares: dict[tuple[tuple[str, str], ...], list[HostProcess]] = {}

    def prestart(self, env: Mapping[str, str], count: int) -> None:
        """Have ``count`` spare hosts booting for ``env``.

        Call it from a thread that outlives the spares (they die with the thread that
        started them): the supervisor's.
        """
        key = tuple(sorted(env.items()))
        with self._lock:
            spares = self._spares[key] = [h for h in self._spares.get(key, []) if h.alive]
            missing = count - len(spares)
        for _ in range(missing):
            host = HostProcess.prestart(env=env)
            with self._lock:
                self._spares.setdefault(key, []).append(host)

    def spawn(
        self,
        key: str,
        module: str,
        *,
        env: Mapping[str, str],
        generation: int,
        fault_injection: bool,
        start_timeout_s: float,
    ) -> HostProcess:
        """A host for ``key`` with ``module`` loaded: a spare for ``env`` when one is alive,
        else a new process; registered under ``key``.

        Raises:
            HostStartError, ModuleLoadError, RemoteError: as :meth:`HostProcess.spawn`.
        """
        spare = None
        with self._lock:
            spares = self._spares.get(tuple(sorted(env.items())), [])
            while spares and spare is None:
                candidate = spares.pop(0)
                if candidate.alive:
                    spare = candidate
        if spare is None:
            host = HostProcess.spawn(
                module,
                env=env,
                generation=generation,
                fault_injection=fault_injection,
                name=key,
                start_timeout_s=start_timeout_s,
            )
        else:
            host = spare
            host.load(
                module,
                generation=generation,
                fault_injection=fault_injection,
                name=key,
                start_timeout_s=start_timeout_s,
            )
        self.add(key, host)
        return host

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
        """Kill the given hosts (default: all of them, spares too), process trees and all."""
        if hosts is None:
            with self._lock:
                spares = [h for group in self._spares.values() for h in group]
                self._spares.clear()
            hosts = [*self.hosts(), *spares]
        for host in list(hosts):
            host.kill()
