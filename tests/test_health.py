"""Health: ``Guard.health()`` and the WSGI / ASGI apps a load balancer asks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx

from conftest import EC_KEY, guard, state_in, wait_until
from p11guard import Config, Guard
from p11guard.metrics import HealthWSGI, health_asgi, health_wsgi
from p11guard.testbed import Testbed


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def served(app: HealthWSGI) -> Iterator[str]:
    """A real HTTP server (wsgiref) on a free loopback port, in a thread."""
    server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/healthz"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_health_says_serving_why_not_and_since_when(net_config: Config, group: Testbed) -> None:
    with guard(net_config) as g:
        h = g.health()
        assert h["serving"] is True and h["state"] == "SERVING" and h["reason"] is None
        assert (h["members_serving"], h["members_total"]) == (1, 1)
        assert h["since"] <= time.time()
        group.fault("lose")
        wait_until(lambda: state_in(g, "LOST", "RECOVERING"), 15, "the loss")
        lost = g.health()
        assert lost["serving"] is False and lost["state"] in ("LOST", "RECOVERING")
        assert "group lost" in lost["reason"] and "CKR_DEVICE_ERROR" in lost["reason"]
        assert lost["since"] > h["since"] and lost["members_serving"] == 0
        group.fault("restore")
        wait_until(lambda: g.health()["serving"], 20, "serving again")
        back = g.health()
        assert back["reason"] is None and back["since"] > lost["since"] and back["generation"] == 1
    closed = g.health()
    assert closed["serving"] is False and closed["state"] == "CLOSED" and "closed" in closed["reason"]


def test_wsgi_health_200_while_serving_503_with_the_reason_otherwise(net_config: Config, group: Testbed) -> None:
    with guard(net_config) as g, served(health_wsgi(g)) as url:
        reply = httpx.get(url, timeout=10)
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "application/json"
        assert reply.json()["status"] == "serving" and reply.json()["state"] == "SERVING"
        assert httpx.head(url, timeout=10).status_code == 200
        assert httpx.post(url, timeout=10).status_code == 405
        group.fault("lose")
        wait_until(lambda: httpx.get(url, timeout=10).status_code == 503, 15, "503")
        body = httpx.get(url, timeout=10).json()
        assert body["serving"] is False and body["status"] == "not serving"
        assert "group lost" in body["reason"]
        group.fault("restore")
        wait_until(lambda: httpx.get(url, timeout=10).status_code == 200, 20, "200 again")


def test_health_with_a_test_signature(net_config: Config) -> None:
    with guard(net_config.replace(workers=1)) as g:
        good = health_wsgi(g, sign_key=EC_KEY, every_s=3600)
        with served(good) as url:
            before = g.status()["counters"]["ops_ok"]
            first = httpx.get(url, timeout=10)
            assert first.status_code == 200 and first.json()["test"]["ok"] is True
            assert httpx.get(url, timeout=10).status_code == 200
            # at most every every_s: the second check used the first one's signature
            assert g.status()["counters"]["ops_ok"] == before + 1
        bad = health_wsgi(g, sign_key="no-such-key", every_s=0)
        with served(bad) as url:
            reply = httpx.get(url, timeout=10)
            assert reply.status_code == 503
            assert "test signature with key 'no-such-key' failed" in reply.json()["reason"]
            assert reply.json()["state"] == "SERVING"  # the group serves; the key does not


def _asgi_get(app: object, path: str = "/healthz") -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            return await client.get(path)

    return asyncio.run(go())


def test_asgi_health(net_config: Config, group: Testbed) -> None:
    with Guard(net_config.replace(workers=1)) as g:
        app = health_asgi(g, sign_key=EC_KEY, every_s=0)
        reply = _asgi_get(app)
        assert reply.status_code == 200 and reply.json()["test"]["ok"] is True
        group.fault("lose")
        wait_until(lambda: _asgi_get(app).status_code == 503, 15, "503")
        assert "group lost" in _asgi_get(app).json()["reason"]
        group.fault("restore")
        wait_until(lambda: _asgi_get(app).status_code == 200, 20, "200 again")
