"""Guard: the public facade. Thread-safe; every method may be called from any thread."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar, cast

from p11guard.actors import FastLane, HostRegistry, Job, KeyPins
from p11guard.base import Config, GuardClosed, GuardFailed
from p11guard.protocol import IDEMPOTENT_OPS
from p11guard.supervisor import (
    AddCallback,
    Close,
    Effects,
    Finalize,
    InjectFault,
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

T = TypeVar("T")
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


class Guard:
    """PKCS#11 operations that survive the loss of the whole HSM group.

    ``with Guard(config) as g:`` starts the probe host, then one host and one worker per
    ``workers.count``, and returns when they are up (raising a clear error if the module
    cannot load, the token is not found, or the PIN is wrong).

    Keys are named by label, never by handle. Each operation exists in three forms:
    ``sign(...)`` blocks, ``submit_sign(...)`` returns a :class:`concurrent.futures.Future`,
    ``await asign(...)`` is for asyncio code.

    Args:
        config: a :class:`Config`, or the path of a TOML config file.
    """

    def __init__(self, config: Config | str | os.PathLike[str]) -> None:
        self.config = config if isinstance(config, Config) else Config.from_file(config)
        self.config.load_pin()  # fail here, with the field named, not in an actor
        self._registry = HostRegistry()
        self._shared = SharedState()
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

    def status(self) -> dict[str, Any]:
        """State, generation, workers, last probe, outages and counters (like LunaHAStatus)."""
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
        self._supervisor.tell(AddCallback(callback))

    # -- submission ---------------------------------------------------------------------

    def _submit(
        self,
        op: str,
        args: dict[str, Any],
        label: str | None = None,
        items: list[tuple[str, dict[str, Any]]] | None = None,
    ) -> Future[Any]:
        if self._closed.is_set():
            raise GuardClosed("the guard is closed")
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()  # accepted work completes; it is not cancelled
        error = refusal(self._shared.state, self.config.policy, op, failed_reason=self._shared.failed_reason)
        if error is not None:  # refused at once: a refused caller never waits for queue space
            future.set_exception(error)
            return future
        # Backpressure: at most queue_max accepted operations not yet completed.
        while not self._admission.acquire(timeout=0.1):
            if self._closed.is_set():
                raise GuardClosed("the guard closed while waiting for queue space")
        future.add_done_callback(lambda _: self._admission.release())
        idempotent = all(o in IDEMPOTENT_OPS for o, _ in items) if items else op in IDEMPOTENT_OPS
        job = Job(
            next(self._seq),
            op,
            args,
            future,
            time.monotonic() + self.config.op_deadline_s,
            idempotent,
            label,
            items,
        )
        if not self._lane.submit(job):  # the supervisor is not running yet / any more
            self._supervisor.tell(Submit(job))
        return future

    def submit(self, op: str, **args: Any) -> Future[Any]:
        """Submit any host operation by name (see :mod:`p11guard.protocol`)."""
        return self._submit(op, args, label=args.get("label"))

    def submit_batch(self, items: Sequence[tuple[str, dict[str, Any]]]) -> Future[list[Any]]:
        """Submit many operations as one frame; the result lists a value or an exception each."""
        if not items:
            done: Future[list[Any]] = Future()
            done.set_result([])
            return done
        return self._submit("batch", {}, items=[(op, dict(a)) for op, a in items])

    def submit_sign(self, key: str, data: bytes, mechanism: str = "ecdsa-sha256") -> Future[bytes]:
        return self._submit("sign", {"key": key, "data": data, "mechanism": mechanism})

    def submit_verify(self, key: str, data: bytes, signature: bytes, mechanism: str = "ecdsa-sha256") -> Future[bool]:
        return self._submit("verify", {"key": key, "data": data, "signature": signature, "mechanism": mechanism})

    def submit_encrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> Future[bytes]:
        return self._submit("encrypt", {"key": key, "data": data, "mechanism": mechanism, "aad": aad})

    def submit_decrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> Future[bytes]:
        return self._submit("decrypt", {"key": key, "data": data, "mechanism": mechanism, "aad": aad})

    def submit_digest(self, data: bytes, mechanism: str = "sha256") -> Future[bytes]:
        return self._submit("digest", {"data": data, "mechanism": mechanism})

    def submit_random(self, n: int) -> Future[bytes]:
        return self._submit("random", {"n": n})

    def submit_public_key(self, key: str) -> Future[bytes]:
        return self._submit("public_key", {"key": key})

    def submit_generate_key_pair(self, label: str, type: str) -> Future[dict[str, Any]]:
        return self._submit("generate_key_pair", {"label": label, "type": type}, label=label)

    def submit_generate_secret(self, label: str, type: str) -> Future[dict[str, Any]]:
        return self._submit("generate_secret", {"label": label, "type": type}, label=label)

    def submit_destroy(self, label: str) -> Future[int]:
        return self._submit("destroy", {"label": label}, label=label)

    def submit_list_keys(self) -> Future[list[dict[str, Any]]]:
        return self._submit("list_keys", {})

    # -- blocking forms -----------------------------------------------------------------

    def sign(self, key: str, data: bytes, mechanism: str = "ecdsa-sha256") -> bytes:
        """Sign ``data`` with the private key labelled ``key``. ECDSA signatures are DER."""
        return self.submit_sign(key, data, mechanism).result()

    def verify(self, key: str, data: bytes, signature: bytes, mechanism: str = "ecdsa-sha256") -> bool:
        """``True`` if ``signature`` is valid for ``data`` under the public key ``key``."""
        return self.submit_verify(key, data, signature, mechanism).result()

    def encrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> bytes:
        """AES-GCM: returns IV (12 bytes) + ciphertext + tag."""
        return self.submit_encrypt(key, data, mechanism, aad).result()

    def decrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> bytes:
        return self.submit_decrypt(key, data, mechanism, aad).result()

    def digest(self, data: bytes, mechanism: str = "sha256") -> bytes:
        return self.submit_digest(data, mechanism).result()

    def random(self, n: int) -> bytes:
        return self.submit_random(n).result()

    def public_key(self, key: str) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo)."""
        return self.submit_public_key(key).result()

    def generate_key_pair(self, label: str, type: str) -> dict[str, Any]:
        """Generate ``ec-p256``, ``ec-p384``, ``rsa-2048``, ``rsa-3072`` or ``ed25519``.
        Never retried after a loss: raises :class:`OutcomeUnknown` instead."""
        return self.submit_generate_key_pair(label, type).result()

    def generate_secret(self, label: str, type: str) -> dict[str, Any]:
        """Generate ``aes-256`` or ``hmac-sha256``."""
        return self.submit_generate_secret(label, type).result()

    def destroy(self, label: str) -> int:
        """Destroy every object labelled ``label``; returns how many."""
        return self.submit_destroy(label).result()

    def list_keys(self) -> list[dict[str, Any]]:
        return self.submit_list_keys().result()

    def sign_many(
        self,
        key: str,
        items: Iterable[bytes],
        mechanism: str = "ecdsa-sha256",
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Sign many items, order kept, in batch frames spread over the workers.

        Args:
            return_exceptions: put the exception of a failed item in its place instead of
                raising the first one.
        """
        futures = [f for _, f in self.submit_sign_many(key, items, mechanism)]
        out: list[Any] = []
        for future in futures:
            out.extend(future.result())
        if not return_exceptions:
            for item in out:
                if isinstance(item, BaseException):
                    raise item
        return out

    def submit_sign_many(
        self, key: str, items: Iterable[bytes], mechanism: str = "ecdsa-sha256"
    ) -> list[tuple[int, Future[list[Any]]]]:
        """Submit signatures in batch frames; returns ``(count, future)`` per frame, in order.
        A frame holds at most ``workers.batch_size`` items and 8 MiB (1 KiB counted per item);
        an item over 16 MiB less 64 KiB is not sent: its frame of one holds a RequestError."""
        from p11guard.base import RequestError
        from p11guard.protocol import MAX_FRAME

        out: list[tuple[int, Future[list[Any]]]] = []
        chunk: list[tuple[str, dict[str, Any]]] = []
        size, item_max = 0, MAX_FRAME - 64 * 1024
        for i, data in enumerate(items):
            cost, too_large = len(data) + 1024, len(data) > item_max
            if chunk and (len(chunk) >= self.config.batch_size or size + cost > 8 * 1024 * 1024 or too_large):
                out.append((len(chunk), self.submit_batch(chunk)))
                chunk, size = [], 0
            if too_large:
                why = f"item {i}: {len(data):,} bytes is more than the {item_max:,} bytes one PKCS#11 call through "
                why += "p11guard can carry (a frame is at most 16 MiB; this is fixed): sign it another way or split it"
                out.append((1, Future()))
                out[-1][1].set_result([RequestError(why, kind="bad_request", name="too_large", op="sign")])
                continue
            chunk.append(("sign", {"key": key, "data": data, "mechanism": mechanism}))
            size += cost
        if chunk:
            out.append((len(chunk), self.submit_batch(chunk)))
        return out

    # -- asyncio forms ------------------------------------------------------------------

    async def _await(self, future: Future[T]) -> T:
        return await asyncio.wrap_future(future)

    async def asign(self, key: str, data: bytes, mechanism: str = "ecdsa-sha256") -> bytes:
        return await self._await(self.submit_sign(key, data, mechanism))

    async def averify(self, key: str, data: bytes, signature: bytes, mechanism: str = "ecdsa-sha256") -> bool:
        return await self._await(self.submit_verify(key, data, signature, mechanism))

    async def aencrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> bytes:
        return await self._await(self.submit_encrypt(key, data, mechanism, aad))

    async def adecrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> bytes:
        return await self._await(self.submit_decrypt(key, data, mechanism, aad))

    async def adigest(self, data: bytes, mechanism: str = "sha256") -> bytes:
        return await self._await(self.submit_digest(data, mechanism))

    async def arandom(self, n: int) -> bytes:
        return await self._await(self.submit_random(n))

    async def apublic_key(self, key: str) -> bytes:
        return await self._await(self.submit_public_key(key))

    async def agenerate_key_pair(self, label: str, type: str) -> dict[str, Any]:
        return await self._await(self.submit_generate_key_pair(label, type))

    async def agenerate_secret(self, label: str, type: str) -> dict[str, Any]:
        return await self._await(self.submit_generate_secret(label, type))

    async def adestroy(self, label: str) -> int:
        return await self._await(self.submit_destroy(label))

    async def alist_keys(self) -> list[dict[str, Any]]:
        return await self._await(self.submit_list_keys())

    async def asign_many(self, key: str, items: Iterable[bytes], mechanism: str = "ecdsa-sha256") -> list[bytes]:
        futures = [f for _, f in self.submit_sign_many(key, items, mechanism)]
        out: list[bytes] = []
        for chunk in await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)):
            for item in chunk:
                if isinstance(item, BaseException):
                    raise item
                out.append(item)
        return out

    # -- fault injection (testing.fault_injection = true) ---------------------------------

    def inject_fault(self, worker: int, action: str, **args: Any) -> Any:
        """Inject a fault into a worker's host: ``fail_next`` (ckr, count, ops), ``hang``
        (seconds), ``crash`` (how = exit | sigkill | segv). Refused by the host unless
        ``testing.fault_injection`` is true."""
        future: Future[Any] = Future()
        self._supervisor.tell(InjectFault(worker, {"action": action, **args}, future))
        return future.result(timeout=self.config.call_s + 5)

    def host_pids(self) -> dict[str, int]:
        """Pids of the live host processes, by name (``worker-0``..., ``probe``)."""
        return {h.name: h.pid for h in self._registry.hosts() if h.alive and h.pid is not None}

    # -- closing ------------------------------------------------------------------------

    def close(self, timeout_s: float | None = None) -> None:
        """Stop taking work; finish what is queued if the group serves, fail it otherwise
        (every Future completes); close sessions politely if the group answers, kill what
        does not. No process is left behind. Idempotent."""
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
