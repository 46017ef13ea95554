"""Health endpoints: a WSGI and an ASGI app (no framework) answering from ``guard.health()``.

200 with JSON while the group serves, 503 with JSON saying why otherwise. With
``sign_key``, the check also signs a fixed payload with that key (at most every
``every_s`` seconds) and answers 503 when that fails -- EJBCA's ``catokensigntest``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from p11guard.base import P11GuardError

if TYPE_CHECKING:
    from p11guard._guard import Guard

__all__ = ["HealthASGI", "HealthCheck", "HealthWSGI", "health_asgi", "health_wsgi"]

PAYLOAD = b"p11guard health check"

WSGIStartResponse = Callable[..., Any]
ASGIScope = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class HealthCheck:
    """``check()`` (blocking) and ``acheck()`` (asyncio) return ``(http_status, body)``.

    Args:
        guard: the guard to report on.
        sign_key: a key label to sign a test payload with; ``None``: state only.
        mechanism: the test signature's mechanism.
        every_s: sign at most this often; between, the last test's result stands (0: each call).
        timeout_s: a test signature not back within this is a failure.
    """

    def __init__(
        self,
        guard: Guard,
        *,
        sign_key: str | None = None,
        mechanism: str = "ecdsa-sha256",
        every_s: float = 10.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.guard = guard
        self.sign_key = sign_key
        self.mechanism = mechanism
        self.every_s = every_s
        self.timeout_s = timeout_s
        self._test: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _due(self) -> bool:
        return self._test is None or time.monotonic() - self._test["_mono"] >= self.every_s

    def _record(self, error: str | None) -> None:
        self._test = {
            "key": self.sign_key,
            "ok": error is None,
            "at": time.time(),
            "error": error,
            "_mono": time.monotonic(),
        }

    def _state(self) -> tuple[dict[str, Any], bool]:
        try:
            health = self.guard.health()
        except P11GuardError as exc:
            return {"serving": False, "state": "UNAVAILABLE", "reason": str(exc)}, False
        return health, bool(health["serving"])

    def _answer(self, health: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        body = dict(health)
        test = self._test
        if self.sign_key is not None and test is not None:
            body["test"] = {k: v for k, v in test.items() if not k.startswith("_")}
            if body["serving"] and not test["ok"]:
                body["serving"] = False
                body["reason"] = f"test signature with key {self.sign_key!r} failed: {test['error']}"
        body["status"] = "serving" if body["serving"] else "not serving"
        return (200 if body["serving"] else 503), body

    def check(self) -> tuple[int, dict[str, Any]]:
        """From any thread; blocks at most ``timeout_s`` for a test signature."""
        health, serving = self._state()
        if serving and self.sign_key is not None and self._due() and self._lock.acquire(blocking=False):
            try:
                if self._due():
                    future = self.guard.submit_sign(self.sign_key, PAYLOAD, self.mechanism)
                    try:
                        future.result(timeout=self.timeout_s)
                        self._record(None)
                    except FutureTimeout:
                        self._record(f"no answer within {self.timeout_s:g} s")
                    except Exception as exc:
                        self._record(f"{type(exc).__name__}: {exc}")
            finally:
                self._lock.release()
        return self._answer(health)

    async def acheck(self) -> tuple[int, dict[str, Any]]:
        """In an event loop; never blocks it (the test signature is awaited)."""
        health, serving = self._state()
        if serving and self.sign_key is not None and self._due() and self._lock.acquire(blocking=False):
            try:
                try:
                    await asyncio.wait_for(self.guard.asign(self.sign_key, PAYLOAD, self.mechanism), self.timeout_s)
                    self._record(None)
                except TimeoutError:
                    self._record(f"no answer within {self.timeout_s:g} s")
                except Exception as exc:
                    self._record(f"{type(exc).__name__}: {exc}")
            finally:
                self._lock.release()
        return self._answer(health)


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, default=str).encode() + b"\n"


_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
_REASONS = {200: "200 OK", 503: "503 Service Unavailable", 405: "405 Method Not Allowed"}


class HealthWSGI:
    """A WSGI app: ``GET`` (or ``HEAD``) answers 200 or 503 with the health JSON."""

    def __init__(self, check: HealthCheck) -> None:
        self.check = check

    def __call__(self, environ: dict[str, Any], start_response: WSGIStartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response(_REASONS[405], [*_HEADERS, ("Allow", "GET, HEAD")])
            return [_json({"error": f"method {method} not allowed: use GET"})]
        code, body = self.check.check()
        data = _json(body)
        start_response(_REASONS[code], [*_HEADERS, ("Content-Length", str(len(data)))])
        return [b""] if method == "HEAD" else [data]


class HealthASGI:
    """An ASGI app, as :class:`HealthWSGI` for asyncio servers; it answers the
    ``lifespan`` protocol too, so it can be served alone. An object, not a function, so
    that Starlette's ``Route("/healthz", endpoint=app)`` treats it as an ASGI app."""

    def __init__(self, check: HealthCheck) -> None:
        self.check = check

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method = scope.get("method", "GET")
        headers = [(k.lower().encode(), v.encode()) for k, v in _HEADERS]
        if method not in ("GET", "HEAD"):
            code, data = 405, _json({"error": f"method {method} not allowed: use GET"})
            headers.append((b"allow", b"GET, HEAD"))
        else:
            code, body = await self.check.acheck()
            data = _json(body)
        headers.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else data})


def health_wsgi(guard: Guard, **options: Any) -> HealthWSGI:
    """The WSGI health app of ``guard``; ``options`` are :class:`HealthCheck`'s
    (``sign_key``, ``mechanism``, ``every_s``, ``timeout_s``)."""
    return HealthWSGI(HealthCheck(guard, **options))


def health_asgi(guard: Guard, **options: Any) -> HealthASGI:
    """The ASGI health app of ``guard`` (mount it at ``/healthz``); options as :func:`health_wsgi`."""
    return HealthASGI(HealthCheck(guard, **options))
