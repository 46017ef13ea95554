"""The testbed's fault proxy in-process, against an echo server: the network faults the
chaos runner and the pytest plugin rely on (latency with order kept, hang, lose, restore)."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from p11guard.testbed._proxy import FaultProxy, event_loop

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


def test_a_connection_beyond_what_select_watches_is_refused_and_the_proxy_serves_on(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"descriptors are capped at {hard}: select()'s limit of 1024 cannot be reached")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    filler: list[int] = []

    async def scenario(proxy: FaultProxy, listen: str) -> None:
        while not filler or filler[-1] < 1030:  # the next sockets get descriptors beyond 1024
            filler.append(os.open(os.devnull, os.O_RDONLY))
        # A blocking client on a thread: the test's own loop cannot watch a descriptor there either.
        assert await asyncio.to_thread(_first_bytes, listen) == b""  # refused: closed at once
        assert proxy.status()["refused"] == 1
        for fd in filler:
            os.close(fd)
        filler.clear()
        await echoing(listen, b"again")  # the loop goes on

    try:
        run(tmp_path, scenario)
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "beyond what select() watches" in capfd.readouterr().err


def _first_bytes(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(path)
        return client.recv(10)
