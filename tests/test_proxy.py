"""The testbed's fault proxy in-process, against an echo server: the network faults the
chaos runner and the pytest plugin rely on (latency with order kept, hang, lose, restore)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from p11guard.testbed._procs import TestbedError, wait_for
from p11guard.testbed._proxy import FaultProxy, event_loop
from p11guard.testbed._proxy_control import proxy_control

Scenario = Callable[[FaultProxy, str], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def main() -> None:
        upstream, listen, control = (str(tmp_path / n) for n in ("up.sock", "proxy.sock", "control.sock"))
        server = await asyncio.start_unix_server(echo, upstream)
        proxy = FaultProxy(listen, upstream, control)
        serving = asyncio.ensure_future(proxy.serve())
        try:
            await asyncio.wait_for(proxy.listening.wait(), 5)
            await asyncio.wait_for(scenario(proxy, listen), 20)
        finally:
            serving.cancel()
            server.close()

    with asyncio.Runner(loop_factory=event_loop) as runner:  # the proxy's own loop
        runner.run(main())


async def echoing(listen: str, hello: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through the proxy whose first bytes came back."""
    reader, writer = await asyncio.open_unix_connection(listen)
    writer.write(hello)
    assert await reader.readexactly(len(hello)) == hello
    return reader, writer


async def nothing_within(reader: asyncio.StreamReader, seconds: float = 0.1) -> bool:
    try:
        await asyncio.wait_for(reader.read(10), seconds)
    except TimeoutError:
        return True
    return False


def test_latency_delays_each_way_and_keeps_order_even_when_lowered(tmp_path: Path) -> None:
    async def scenario(proxy: FaultProxy, listen: str) -> None:
        reader, writer = await asyncio.open_unix_connection(listen)
        proxy.apply("latency", 20)
        sent = b"".join(b"%03d" % i for i in range(50))
        start = time.monotonic()
        for i in range(50):
            writer.write(b"%03d" % i)
        assert await reader.readexactly(len(sent)) == sent
        assert time.monotonic() - start >= 0.04  # 20 ms each way
        proxy.apply("latency", 100)
        writer.write(b"A")
        await writer.drain()
        proxy.apply("latency", 0)
        writer.write(b"B")  # due before A: still delivered after it
        assert await reader.readexactly(2) == b"AB"

    run(tmp_path, scenario)


def test_hang_holds_old_and_new_connections_and_restore_delivers_all(tmp_path: Path) -> None:
    async def scenario(proxy: FaultProxy, listen: str) -> None:
        reader, writer = await echoing(listen, b"before")
        proxy.apply("hang")
        writer.write(b"held")
        late_reader, late_writer = await asyncio.open_unix_connection(listen)  # accepted, never answered
        late_writer.write(b"new")
        assert await nothing_within(reader) and await nothing_within(late_reader)
        proxy.apply("restore")
        assert await reader.readexactly(4) == b"held" and await late_reader.readexactly(3) == b"new"

    run(tmp_path, scenario)


def test_lose_closes_every_connection_and_refuses_new_ones_until_restore(tmp_path: Path) -> None:
    async def scenario(proxy: FaultProxy, listen: str) -> None:
        reader, _ = await echoing(listen, b"x")
        proxy.apply("lose")
        assert await reader.read(10) == b""  # closed
        refused_reader, _ = await asyncio.open_unix_connection(listen)
        assert await refused_reader.read(10) == b""
        assert proxy.status()["refused"] == 1 and proxy.status()["connections"] == 0
        proxy.apply("restore")
        await echoing(listen, b"ok")

    run(tmp_path, scenario)


@pytest.mark.parametrize("latency_ms", [0, 5])
def test_a_large_transfer_arrives_whole_and_a_closed_end_closes_the_link(tmp_path: Path, latency_ms: int) -> None:
    async def scenario(proxy: FaultProxy, listen: str) -> None:
        proxy.apply("latency", latency_ms)
        reader, writer = await asyncio.open_unix_connection(listen)
        blob = os.urandom(8 << 20)
        echoed = asyncio.ensure_future(reader.readexactly(len(blob)))
        writer.write(blob)
        await writer.drain()
        assert await echoed == blob
        writer.write(b"tail")
        writer.write_eof()  # while "tail" may still be held by the latency timer
        assert await reader.read() == b"tail"  # delivered, then the link closes
        assert proxy.status()["connections"] == 0

    run(tmp_path, scenario)


def test_a_storm_of_connections_runs_the_proxy_out_of_descriptors_not_out_of_its_loop(tmp_path: Path) -> None:
    """The proxy's loop waits with select(), which cannot watch a descriptor beyond 1023: the
    proxy caps its open files there, so a storm meets EMFILE and the proxy lives on."""
    need = 4000  # the storm's client ends and the upstream's held ends, in this process
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), max(hard, need)))
    except (ValueError, OSError):
        pytest.skip(f"cannot open {need} descriptors here (hard limit {hard})")
    up, listen, control = (str(tmp_path / n) for n in ("up.sock", "proxy.sock", "control.sock"))
    held: list[socket.socket] = []
    upstream = socket.socket(socket.AF_UNIX)
    upstream.bind(up)
    upstream.listen(4096)
    holding = threading.Thread(target=_hold, args=(upstream, held), daemon=True)
    holding.start()
    log = (tmp_path / "proxy.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "p11guard.testbed._proxy", "--listen", listen, "--upstream", up, "--control", control],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    clients: list[socket.socket] = []
    try:
        wait_for(lambda: os.path.exists(control), 10, "the proxy's control socket")
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert re.search(r"Max open files\s+1024\s", limits), limits
        while len(clients) < 700 and (client := _connected(listen)) is not None:
            clients.append(client)
        assert proc.poll() is None, (tmp_path / "proxy.log").read_text()
        # More links than 1024 descriptors hold (two a link), and never a descriptor beyond.
        assert len(clients) > 512 and len(held) < 1024, (len(clients), len(held))
        upstream.shutdown(socket.SHUT_RDWR)  # wakes the holder; a link made from now on finds no upstream
        holding.join(5)
        storm = len(clients)
        for sock in [*clients, *held]:  # a link ends when both of its ends have
            sock.close()
        clients.clear()
        # Every client of the storm is accepted in the end (the last ones from the backlog).
        _status_when(control, lambda s: s["connections"] == 0 and s["accepted"] == storm)
        with socket.socket(socket.AF_UNIX) as late:  # and it accepts again
            late.connect(listen)
            _status_when(control, lambda s: s["accepted"] == storm + 1)
    finally:
        for client in clients:
            client.close()
        proc.terminate()
        proc.wait(10)
        log.close()
        upstream.close()
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _connected(path: str) -> socket.socket | None:
    """A client the proxy accepted (or queued), or None once it has taken none for 3 s."""
    client: list[socket.socket] = []

    def attempt() -> bool:
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)  # a full backlog answers EAGAIN instead of blocking for good
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            return False
        client.append(sock)
        return True

    try:
        wait_for(attempt, 3, "the proxy to accept")
    except TestbedError:
        return None
    return client[0]


def _hold(server: socket.socket, held: list[socket.socket]) -> None:
    """Accept and keep every upstream connection, so that the proxy's ends stay open."""
    with contextlib.suppress(OSError):  # the test closes the listening socket
        while True:
            held.append(server.accept()[0])


def _status_when(control: str, cond: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    status: dict[str, Any] = {}

    def check() -> bool:
        status.update(proxy_control(control, {"cmd": "status"}))
        return cond(status)

    try:
        wait_for(check, 15, "the proxy's status to change")
    except TestbedError as exc:
        raise AssertionError(f"{exc}; last status: {status}") from None
    return status
