"""Guard: the public facade. Thread-safe; every method may be called from any thread."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, cast

from p11guard._fork import fork_epoch
from p11guard._health import health_view
from p11guard._operations import Operations
from p11guard.actors import FastLane, HostRegistry, Job, KeyPins, Ticket, run_direct
from p11guard.base import Config, GuardClosed, GuardFailed, GuardForked, P11GuardError
from p11guard.protocol import IDEMPOTENT_OPS
from p11guard.supervisor import (
    AddCallback,
    AddObserver,
    Close,
    Effects,
    Finalize,
    InjectFault,
    JobObserver,
    SharedState,
    State,
    StatusRequest,
    Submit,
    Supervisor,
    SupervisorTick,
    refusal,
)

__all__ = ["Guard"]

# A library logs; the application decides where it goes (the CLI shows it with -v).
logging.getLogger("p11guard").addHandler(logging.NullHandler())

_TICK_S = 0.05


class _Ticker(threading.Thread):
    """Sends the supervisor its clock tick (deadlines, periodic probes)."""

    def __init__(self, tell: Callable[[Any], None]) -> None:
        super().__init__(name="p11guard-ticker", daemon=True)
        self._tell = tell
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(_TICK_S):
            try:
                self._tell(SupervisorTick())
            except Exception:  # the supervisor is gone
                return


class Guard(Operations):
    """PKCS#11 operations that survive the loss of the whole HSM group.

    ``with Guard(config) as g:`` starts the probe host, then one host and one worker per
    ``workers.count``, and returns when they are up (raising a clear error if the module
    cannot load, the token is not found, or the PIN is wrong).

    Keys are named by label, never by handle. Each operation exists in three forms:
    ``sign(...)`` blocks, ``submit_sign(...)`` returns a :class:`concurrent.futures.Future`,
    ``await asign(...)`` is for asyncio code.

    A guard belongs to the process that created it: in a child of ``os.fork()`` every
    method raises :class:`GuardForked` at once (create the guard after the fork).

    Args:
        config: a :class:`Config`, or the path of a TOML config file.
    """

    def __init__(self, config: Config | str | os.PathLike[str]) -> None:
        self._pid, self._fork_epoch = os.getpid(), fork_epoch()
        self.config = config if isinstance(config, Config) else Config.from_file(config)
        self.config.load_pin()  # fail here, with the field named, not in an actor
        self._registry = HostRegistry()
        self._shared = SharedState()
        self._observers: list[JobObserver] = []
        self._admission = threading.BoundedSemaphore(self.config.queue_max)
        self._seq = itertools.count(1)
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        started: Future[None] = Future()
        self._lane = FastLane()
        self._pins = KeyPins()
        effects = Effects(self._registry, self._lane, self._pins)
        self._supervisor = Supervisor.start(self.config, started, self._shared, effects)
        self._ticker = _Ticker(self._supervisor.tell)
        self._ticker.start()
        try:
            started.result(timeout=self.config.start_s * 2 + self.config.probe_s)
        except BaseException as exc:
            self.close(timeout_s=2.0)
            if isinstance(exc, FutureTimeout):
                raise GuardFailed(f"start did not finish within {self.config.start_s * 2:g} s") from None
            raise

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Guard state={self._shared.state} generation={self._shared.generation}>"

    # -- state --------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The supervisor's state: SERVING, SUSPECT, LOST, RECOVERING, FAILED or CLOSED."""
        return str(self._shared.state)

    @property
    def members_serving(self) -> tuple[int, int]:
        """How many members serve, of how many (``(1, 1)`` for a group that lists none)."""
        return self._shared.members_serving, self._shared.members_total

    @property
    def generation(self) -> int:
        return self._shared.generation

    @property
    def recoveries(self) -> int:
        """How many full recoveries have completed."""
        return self._shared.recoveries

    def _check_fork(self) -> None:
        if self._fork_epoch != fork_epoch():
            raise GuardForked(self._pid)

    def health(self) -> dict[str, Any]:
        """``serving`` (bool), ``state``, ``reason`` (``None`` while serving: else the failure
        or outage cause), ``since`` (``time.time()`` of the last state change),
        ``generation``, ``members_serving``, ``members_total``. Cheap: asks no actor."""
        self._check_fork()
        return health_view(self._shared)

    def status(self) -> dict[str, Any]:
        """State, generation, workers, last probe, outages and counters (like LunaHAStatus)."""
        self._check_fork()
        if self._closed.is_set() and not self._supervisor.is_alive():
            return {"state": str(State.CLOSED), "generation": self._shared.generation}
        return cast(dict[str, Any], self._supervisor.ask(StatusRequest(), timeout=10))

    def refresh_keys(self, labels: Iterable[str] | None = None) -> None:
        """Accept keys changed outside this guard (rotated with another tool): forget the
        fingerprints pinned for ``labels`` (all with None); each is pinned again at its next
        use. Keys made or destroyed through this guard need no refresh."""
        self._pins.forget(labels)

    def on_state_change(self, callback: Callable[[str, str, dict[str, Any]], None]) -> None:
        """Call ``callback(old, new, info)`` on every state change (in the supervisor's thread;
        keep it short and never call back into the guard from it)."""
        self._check_fork()
        self._supervisor.tell(AddCallback(callback))

    def add_observer(self, observer: JobObserver) -> None:
        """Call ``observer(job, result, error)`` as every operation ends, refused ones too
        (under the supervisor's lock, on the hot path: keep it to a few counter updates;
        :mod:`p11guard.metrics` is the observer you want). ``job`` has ``op``, ``items``
        (a batch's ``(op, args)`` list, else ``None``) and ``submitted`` (monotonic)."""
        self._check_fork()
        self._observers.append(observer)
        self._supervisor.ask(AddObserver(observer), timeout=10)

    # -- submission ---------------------------------------------------------------------

    def _accept(
        self,
        op: str,
        args: dict[str, Any],
        label: str | None = None,
        items: list[tuple[str, dict[str, Any]]] | None = None,
    ) -> Job | Future[Any]:
        """A job for the supervisor, or a Future already refused."""
        if self._fork_epoch != fork_epoch():
            raise GuardForked(self._pid)
        if self._closed.is_set():
            raise GuardClosed("the guard is closed")
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()  # accepted work completes; it is not cancelled
        now = time.monotonic()
        error = refusal(self._shared.state, self.config.policy, op, failed_reason=self._shared.failed_reason)
        if error is not None:  # refused at once: a refused caller never waits for queue space
            self._refused(Job(0, op, args, future, now, False, label, items, submitted=now), error)
            future.set_exception(error)
            return future
        # Backpressure: at most queue_max accepted operations not yet completed.
        while not self._admission.acquire(timeout=0.1):
            if self._closed.is_set():
                raise GuardClosed("the guard closed while waiting for queue space")
        future.add_done_callback(lambda _: self._admission.release())
        idempotent = all(o in IDEMPOTENT_OPS for o, _ in items) if items else op in IDEMPOTENT_OPS
        seq = next(self._seq)
        return Job(seq, op, args, future, now + self.config.op_deadline_s, idempotent, label, items, submitted=now)

    def _submit(
        self,
        op: str,
        args: dict[str, Any],
        label: str | None = None,
        items: list[tuple[str, dict[str, Any]]] | None = None,
    ) -> Future[Any]:
        job = self._accept(op, args, label, items)
        if isinstance(job, Future):
            return job
        if not self._lane.submit(job):  # the supervisor is not running yet / any more
            self._supervisor.tell(Submit(job))
        return job.future

    def _call(self, op: str, args: dict[str, Any], label: str | None = None) -> Any:
        job = self._accept(op, args, label)
        if isinstance(job, Future):
            return job.result()
        ticket = self._lane.submit_direct(job)
        if ticket is False:  # the supervisor is not running yet / any more
            self._supervisor.tell(Submit(job))
        elif isinstance(ticket, Ticket):  # a free worker's host: run it here, no thread hand-off
            run_direct(job, ticket, self._pins, self._lane, self._supervisor.tell)
        return job.future.result()

    def _refused(self, job: Job, error: P11GuardError) -> None:
        """Tell the observers of a job refused before it reached the supervisor."""
        if self._observers:
            with self._lane.lock:  # observers run one at a time, as in the supervisor
                for observer in self._observers:
                    try:
                        observer(job, None, error)
                    except Exception:
                        logging.getLogger("p11guard").exception("a job observer failed on a refused job")

    # -- fault injection (testing.fault_injection = true) ---------------------------------

    def inject_fault(self, worker: int, action: str, **args: Any) -> Any:
        """Inject a fault into a worker's host: ``fail_next`` (ckr, count, ops), ``hang``
        (seconds), ``crash`` (how = exit | sigkill | segv). Refused by the host unless
        ``testing.fault_injection`` is true."""
        self._check_fork()
        future: Future[Any] = Future()
        self._supervisor.tell(InjectFault(worker, {"action": action, **args}, future))
        return future.result(timeout=self.config.call_s + 5)

    def host_pids(self) -> dict[str, int]:
        """Pids of the live host processes, by name (``worker-0``..., ``probe``)."""
        self._check_fork()
        return {h.name: h.pid for h in self._registry.hosts() if h.alive and h.pid is not None}

    # -- closing ------------------------------------------------------------------------

    def close(self, timeout_s: float | None = None) -> None:
        """Stop taking work; finish what is queued if the group serves, fail it otherwise
        (every Future completes); close sessions politely if the group answers, kill what
        does not. No process is left behind. Idempotent.

        In a forked child it only marks this copy closed: the hosts are the parent's."""
        if self._fork_epoch != fork_epoch():
            self._closed.set()
            return
        with self._close_lock:
            if self._closed.is_set() and not self._supervisor.is_alive():
                return
            self._closed.set()
            timeout = self.config.call_s + self.config.probe_s if timeout_s is None else timeout_s
            drained: Future[None] = Future()
            try:
                self._supervisor.tell(Close(drained))
                drained.result(timeout=timeout)
            except Exception:
                pass  # not drained in time: what is left is failed by Finalize
            refs: list[Any] = []
            try:
                refs = cast(list[Any], self._supervisor.ask(Finalize(min(2.0, self.config.probe_s)), timeout=10))
            except Exception:
                pass
            end = time.monotonic() + min(3.0, timeout)
            for ref in refs:
                ref.actor_stopped.wait(max(0.0, end - time.monotonic()))
            self._registry.kill()  # whatever did not close politely
            for ref in refs:
                if not ref.actor_stopped.wait(5.0):
                    ref.stop(block=False)
            self._ticker.stopped.set()
            if self._supervisor.is_alive():
                self._supervisor.stop(block=True, timeout=10)
            self._registry.kill()
