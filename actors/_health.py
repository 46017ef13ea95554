"""HealthActor: loss reports in, probe verdicts out, from a probe host of its own."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import pykka

from p11guard.actors._messages import HostRegistry, ProbeResult, Report, Shutdown, StartProbe
from p11guard.base import DEFAULT_MEMBER, Config, HostError, HostTimeout, RemoteError, Secret
from p11guard.host import HostProcess
from p11guard.protocol import LOSS_KINDS

__all__ = ["HealthActor", "Tick"]

log = logging.getLogger("p11guard")


class Tick:
    """Periodic probe request (sent while the member is in service)."""

    def __init__(self, generation: int) -> None:
        self.generation = generation


class HealthActor(pykka.ThreadingActor):
    """Confirms or refutes loss signals with a probe, like ``LunaHAStatus.isOK()``.

    One HealthActor watches one member of the group (``config`` is that member's). The
    probe runs in a dedicated small host, so it is never stuck behind a worker's call and
    has its own deadline (``probe_s``). A new member generation always gets a fresh probe
    host: a module instance that saw the loss stays broken until it is re-initialised.
    """

    use_daemon_thread = True  # a process whose guard was never closed still exits

    def __init__(
        self,
        config: Config,
        supervisor: pykka.ActorRef[Any],
        registry: HostRegistry,
        current_generation: Callable[[], int],
        member: str = DEFAULT_MEMBER,
        key: str = "probe",
    ) -> None:
        super().__init__()
        self.member = member
        self.key = key
        self.current_generation = current_generation
        self.config = config
        self.supervisor = supervisor
        self.registry = registry
        self.host: HostProcess | None = None
        self.generation = -1
        self.host_generation = 0
        self._pin: Secret | None = None
        self._last_probe = 0.0

    def on_stop(self) -> None:
        self._drop_host()

    def on_failure(self, *exc_info: Any) -> None:
        self._drop_host()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, StartProbe):
            self._fresh_probe(message)
        elif isinstance(message, Report):
            # Reports from a generation the supervisor has left behind are moot.
            if message.generation == self.generation == self.current_generation():
                self._probe(cause=f"worker {message.wid}: {message.error}")
        elif isinstance(message, Tick):
            if message.generation == self.generation == self.current_generation():
                self._probe(cause=None, periodic=True)
        elif isinstance(message, Shutdown):
            if self.host is not None and self.host.broken is None:
                self.host.close(message.deadline_s)
            self._drop_host()
            self.stop()
        return None

    def _drop_host(self) -> None:
        if self.host is not None:
            self.host.kill()
            self.registry.remove(self.key, self.host)
            self.host = None

    def _spawn(self, generation: int, pin: Secret) -> dict[str, Any]:
        self._drop_host()
        self.generation = generation
        self.host = self.registry.spawn(
            self.key,
            self.config.module_path,
            env=self.config.module_env,
            generation=self.host_generation,
            fault_injection=self.config.fault_injection,
            start_timeout_s=self.config.start_s,
        )
        self.host.open(self.config.token_label, pin, self.config.probe_s)
        info: dict[str, Any] = self.host.call("probe", {}, self.config.probe_s)
        return info

    def _fresh_probe(self, message: StartProbe) -> None:
        start = time.monotonic()
        self._pin = message.pin
        self.host_generation = message.host_generation
        try:
            info = self._spawn(message.generation, message.pin)
        except Exception as exc:  # any failure to start a probe host is the probe failing
            self._drop_host()
            self._tell(
                ProbeResult(
                    message.generation,
                    False,
                    time.time(),
                    time.monotonic() - start,
                    exc,
                    fresh=True,
                    cause=str(exc),
                    member=self.member,
                    started=start,
                )
            )
            return
        given = None
        if message.handover and self.host is not None:
            # The next periodic probe starts a probe host of its own again.
            given, self.host = self.host, None
            self.registry.remove(self.key, given)
        self._tell(
            ProbeResult(
                message.generation,
                True,
                time.time(),
                time.monotonic() - start,
                fresh=True,
                info=info,
                member=self.member,
                host=given,
                started=start,
            )
        )
        if given is not None:
            # A probe host of our own again at once, not at the next periodic probe: a hang
            # right after a recovery must meet a probe call (probe_s), not a start (start_s).
            try:
                self._spawn(message.generation, message.pin)
            except (RemoteError, HostError) as exc:
                log.debug("probe host of %s not restarted (%s); the next probe tries again", self.member, exc)
                self._drop_host()

    def _probe(self, cause: str | None, periodic: bool = False) -> None:
        if periodic and time.monotonic() - self._last_probe < self.config.probe_interval_s / 2:
            return  # a report just made us probe: no need for another
        start = time.monotonic()
        self._last_probe = start
        error: BaseException | None = None
        info: dict[str, Any] = {}
        for attempt in range(2):
            try:
                if self.host is None or self.host.broken is not None:
                    # Our own host died (a crash is not evidence about the group): one fresh try.
                    if self._pin is None:
                        raise HostError("no probe host", generation=self.generation)
                    info = self._spawn(self.generation, self._pin)
                else:
                    info = self.host.call("probe", {}, self.config.probe_s)
                error = None
                break
            except Exception as exc:
                error = exc
                # A hang, a loss code or a PIN error is decisive at once. Our own host
                # crashing is not evidence, nor is one CKR_GENERAL_ERROR (SoftHSM2 answers
                # that now and then while another process rewrites the token): one more
                # try. A second failure of any kind is the verdict: the member is lost.
                evidence = isinstance(exc, HostTimeout) or (
                    isinstance(exc, RemoteError) and exc.kind in (*LOSS_KINDS, "auth", "config")
                )
                if evidence or attempt:
                    break
                if isinstance(exc, HostError):
                    self._drop_host()
                else:
                    time.sleep(random.uniform(0.01, 0.05))  # let the other writer finish
        if error is not None:
            self._drop_host()
        self._tell(
            ProbeResult(
                self.generation,
                error is None,
                time.time(),
                time.monotonic() - start,
                error,
                periodic=periodic,
                cause=cause,
                info=info,
                member=self.member,
                started=start,
                host_loaded_at=self.host.loaded_at if self.host is not None else 0.0,
            )
        )

    def _tell(self, result: ProbeResult) -> None:
        if not result.ok:
            log.debug("probe of %s failed (generation %d): %s", self.member, result.generation, result.error)
        self.supervisor.tell(result)
