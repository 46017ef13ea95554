"""CryptoWorker: one pykka actor, one host process, one logged-in session."""

from __future__ import annotations

import logging
from typing import Any

import pykka

from p11guard.actors._messages import (
    FastLane,
    HostRegistry,
    Inject,
    Job,
    JobDone,
    Renew,
    RunJob,
    Shutdown,
    WorkerFailed,
    WorkerReady,
    WorkerStopped,
    worker_key,
)
from p11guard.actors._pins import KeyPins, check_keys, repin
from p11guard.base import Config, RemoteError, Secret
from p11guard.host import HostProcess
from p11guard.protocol import ANSWER_KINDS, SIGNAL_KINDS

__all__ = ["CryptoWorker"]

log = logging.getLogger("p11guard")


class CryptoWorker(pykka.ThreadingActor):
    """Runs jobs on its own host; reports every outcome to the supervisor.

    The worker never decides about the group: it reports failures (also those of
    ``on_start``) and waits to be renewed or stopped. A worker blocked in a host call cannot
    handle a stop message, so the supervisor kills the host first: the call then fails at
    once and the stop is handled next.
    """

    use_daemon_thread = True  # a process whose guard was never closed still exits

    def __init__(
        self,
        wid: int,
        generation: int,
        config: Config,
        pin: Secret,
        supervisor: pykka.ActorRef[Any],
        registry: HostRegistry,
        lane: FastLane | None = None,
        host: HostProcess | None = None,
        pins: KeyPins | None = None,
    ) -> None:
        super().__init__()
        self.pins = pins
        self._given = host
        self.lane = lane
        self.wid = wid
        self.generation = generation
        self.config = config
        self._pin: Secret | None = pin
        self.supervisor = supervisor
        self.registry = registry
        self.host: HostProcess | None = None
        self.key = worker_key(wid)

    # -- life cycle ---------------------------------------------------------------------

    def on_start(self) -> None:
        given, self._given = self._given, None
        if given is not None and given.alive and given.broken is None:
            # A probe host that just logged in: its session is this worker's.
            self._pin = None
            self.host = given
            given.name = self.key
            self.registry.add(self.key, given)
            ready = WorkerReady(self.wid, self.generation, given.pid or 0, 1, host_loaded_at=given.loaded_at)
            self.supervisor.tell(ready)
            return
        if given is not None:
            given.kill()
        self._bring_up(new_host=True)

    def _bring_up(self, new_host: bool) -> None:
        pin, self._pin = self._pin, None  # used once, then forgotten
        assert pin is not None
        try:
            if new_host or self.host is None or not self.host.alive:
                self._drop_host()
                self.host = self.registry.spawn(
                    self.key,
                    self.config.module_path,
                    env=self.config.module_env,
                    generation=self.generation,
                    fault_injection=self.config.fault_injection,
                    start_timeout_s=self.config.start_s,
                )
            info = self.host.open(self.config.token_label, pin, self.config.call_s)
        except Exception as exc:
            self._drop_host()
            self.supervisor.tell(WorkerFailed(self.wid, self.generation, exc))
            return
        token: dict[str, Any] = info["token"] if isinstance(info.get("token"), dict) else {}
        mechanisms: dict[str, Any] = info["mechanisms"] if isinstance(info.get("mechanisms"), dict) else {}
        pid, opened = self.host.pid or 0, int(info["sessions_opened"])
        loaded_at = self.host.loaded_at
        self.supervisor.tell(WorkerReady(self.wid, self.generation, pid, opened, token, mechanisms, loaded_at))

    def _drop_host(self) -> None:
        if self.host is not None:
            self.host.kill()
            self.registry.remove(self.key, self.host)
            self.host = None

    def on_stop(self) -> None:
        self._drop_host()
        self.supervisor.tell(WorkerStopped(self.wid, self.generation))

    def on_failure(self, *exc_info: Any) -> None:
        self._drop_host()
        self.supervisor.tell(WorkerStopped(self.wid, self.generation))

    # -- messages -----------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, RunJob):
            if message.more:
                self._run_frame([message.job, *message.more])
            else:
                self._run(message.job)
        elif isinstance(message, Renew):
            self._pin = message.pin
            self._bring_up(new_host=message.new_host)
        elif isinstance(message, Inject):
            self._inject(message)
        elif isinstance(message, Shutdown):
            if self.host is not None and self.host.broken is None:
                self.host.close(message.deadline_s)
            self.stop()
        return None

    def _run(self, job: Job) -> None:
        host = self.host
        try:
            if host is None:
                raise RuntimeError("worker has no host")
            self._check_keys(host, job)
            if job.items is not None:
                results = host.call_batch(job.items, self.config.call_s)
                # A loss signal inside a batch: the supervisor holds the whole frame for the
                # probe's verdict (retried as a whole, or answered item by item).
                signal = next((r for r in results if isinstance(r, RemoteError) and r.kind in SIGNAL_KINDS), None)
                if signal is not None:
                    self.supervisor.tell(JobDone(self.wid, self.generation, job, result=results, error=signal))
                    return
                result: Any = results
            else:
                result = host.call(job.op, job.args, self.config.call_s)
            self._repin(job, result)
            outcome = JobDone(self.wid, self.generation, job, result=result)
            # Success goes straight to the supervisor's books (and the caller's Future)
            # from this thread; failures are messages, for the supervisor to decide.
            if self.lane is not None and self.lane.deliver(outcome):
                return
        except Exception as exc:
            if host is not None and host.broken is not None:
                self._drop_host()  # hung, crashed or poisoned: never reused
            outcome = JobDone(self.wid, self.generation, job, error=exc)
        self.supervisor.tell(outcome)

    def _run_frame(self, jobs: list[Job]) -> None:
        """Single operations coalesced into one frame: one round trip, and each job gets
        its own result or its own error (one bad item never fails the others)."""
        host = self.host
        done: list[JobDone] = []
        try:
            if host is None:
                raise RuntimeError("worker has no host")
            ready: list[Job] = []
            for job in jobs:
                try:
                    self._check_keys(host, job)
                except RemoteError as exc:
                    if exc.kind not in ANSWER_KINDS:
                        raise  # a signal: the whole frame meets it
                    done.append(JobDone(self.wid, self.generation, job, error=exc))
                else:
                    ready.append(job)
            results = host.call_batch([(job.op, job.args) for job in ready], self.config.call_s) if ready else []
        except Exception as exc:
            if host is not None and host.broken is not None:
                self._drop_host()  # hung, crashed or poisoned: never reused
            for job in jobs:
                if not any(d.job is job for d in done):
                    done.append(JobDone(self.wid, self.generation, job, error=exc))
            for outcome in done:
                self.supervisor.tell(outcome)
            return
        good: list[JobDone] = []
        for job, result in zip(ready, results, strict=True):
            if isinstance(result, BaseException):
                done.append(JobDone(self.wid, self.generation, job, error=result))
            else:
                good.append(JobDone(self.wid, self.generation, job, result=result))
        # Successes go to the supervisor's books (and their callers) at once, under one
        # lock; failures are messages, for the supervisor to decide.
        if good and not (self.lane is not None and self.lane.deliver_all(good)):
            done.extend(good)
        for outcome in done:
            self.supervisor.tell(outcome)

    def _check_keys(self, host: HostProcess, job: Job) -> None:
        check_keys(host, job, self.pins, self.config.call_s)

    def _repin(self, job: Job, result: Any) -> None:
        repin(self.pins, job, result)

    def _inject(self, message: Inject) -> None:
        try:
            if self.host is None:
                raise RuntimeError(f"worker {self.wid} has no host")
            message.future.set_result(self.host.call("fault", message.args, self.config.call_s))
        except Exception as exc:
            message.future.set_exception(exc)
