"""A signing service on p11guard: Starlette, served by uvicorn.

    POST /sign         body: the bytes to sign -> {"signature": base64 (ECDSA: DER), "key": ...}
    GET  /public-key   the key's PEM, to verify with
    GET  /healthz      200 while the HSM group serves, 503 with the reason otherwise
    GET  /metrics      Prometheus

Run it (``pip install 'p11guard[metrics]' starlette uvicorn``)::

    P11GUARD_CONFIG=/etc/p11guard/p11guard.toml SIGNING_KEY=release-key \\
        uvicorn signing_service:create_app --factory --host 127.0.0.1 --port 8080

Answers: 200 with the signature; 400 for a request the HSM refuses (unknown key, bad
data); 503 (``Retry-After: 1``) when the guard cannot serve -- the group is lost and the
policy is ``fail_fast``, an operation passed its deadline, the guard failed or closed.
With policy ``queue`` a request waits through an outage and then succeeds.

The guard is created in :func:`create_app`, which uvicorn calls in the process that
serves (``--factory``). Never create it in a process that forks its workers afterwards
(gunicorn ``--preload``): see docs/service.md.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from p11guard import Guard, P11GuardError, UserError
from p11guard.metrics import health_asgi, register


def create_app() -> Starlette:
    """The app, with its guard (config from ``P11GUARD_CONFIG``, key from ``SIGNING_KEY``)."""
    config = os.environ.get("P11GUARD_CONFIG")
    if not config:
        raise SystemExit("signing_service: set P11GUARD_CONFIG to the p11guard config file")
    key = os.environ.get("SIGNING_KEY", "signing-key")
    guard = Guard(config)  # raises (PIN, token, module...) before the server takes requests
    registry = CollectorRegistry()
    register(guard, registry)

    async def sign(request: Request) -> Response:
        data = await request.body()
        try:
            signature = await guard.asign(key, data)
        except UserError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except P11GuardError as exc:  # out of service, deadline, failed, closed: try later
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"signature": base64.b64encode(signature).decode(), "key": key})

    async def public_key(request: Request) -> Response:
        try:
            pem = await guard.apublic_key(key)
        except P11GuardError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})
        return Response(pem, media_type="application/x-pem-file")

    async def metrics(request: Request) -> Response:
        # Reading the guard's status asks its supervisor: off the event loop.
        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(guard.close)  # finishes what is queued, stops every host

    return Starlette(
        routes=[
            Route("/sign", sign, methods=["POST"]),
            Route("/public-key", public_key, methods=["GET"]),
            Route("/healthz", health_asgi(guard), methods=["GET", "HEAD"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
