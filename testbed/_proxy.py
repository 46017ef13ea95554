"""The fault proxy: Unix socket to Unix socket, with the faults of a network HSM group.

Run as its own process (``python -m p11guard.testbed._proxy``); controlled through a
second Unix socket with one JSON object per line:
``{"cmd": "lose" | "restore" | "hang" | "latency" | "status", "ms": N}``.

- ``lose``: close every client connection, refuse new ones (the whole group is gone).
- ``restore``: accept again and forward normally.
- ``hang``: keep connections open but forward nothing, either way; new connections are
  accepted and never answered.
- ``latency MS``: add MS ms one way to every chunk in each direction, order kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from typing import Any

__all__ = ["FaultProxy", "main"]

_CHUNK = 256 * 1024


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()


class FaultProxy:
    """Forwards bytes between clients and the p11-kit server, and injects faults."""

    def __init__(self, listen: str, upstream: str, control: str) -> None:
        self.listen_path = listen
        self.upstream_path = upstream
        self.control_path = control
        self.mode = "normal"
        self.latency_s = 0.0
        self.links: set[_Link] = set()
        self.forwarding = asyncio.Event()
        self.forwarding.set()
        self.accepted = 0
        self.refused = 0

    async def serve(self) -> None:
        for path in (self.listen_path, self.control_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        server = await asyncio.start_unix_server(self._on_client, self.listen_path)
        control = await asyncio.start_unix_server(self._on_control, self.control_path)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server, control:
            await stop.wait()
        for link in list(self.links):
            link.close()
        for path in (self.listen_path, self.control_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- data path ----------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "lost":
            self.refused += 1
            writer.transport.abort()
            return
        self.accepted += 1
        link = _Link(writer)
        self.links.add(link)
        try:
            await self.forwarding.wait()  # a connection made during a hang is never answered
            if self.mode == "lost":
                return
            try:
                up_reader, up_writer = await asyncio.open_unix_connection(self.upstream_path)
            except OSError:
                return  # server down: the client sees the connection close
            link.upstream = up_writer
            link.tasks = [
                asyncio.ensure_future(self._pump(reader, up_writer)),
                asyncio.ensure_future(self._pump(up_reader, writer)),
            ]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.close()
            self.links.discard(link)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        writer = asyncio.ensure_future(self._deliver(queue, dst))
        try:
            while True:
                data = await src.read(_CHUNK)
                if not data:
                    break
                queue.put_nowait((time.monotonic() + self.latency_s, data))
            await queue.join()
        finally:
            writer.cancel()

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter) -> None:
        while True:
            due, data = await queue.get()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.forwarding.wait()  # hang: hold every byte
            dst.write(data)
            await dst.drain()
            queue.task_done()

    # -- control ------------------------------------------------------------------------

    def apply(self, cmd: str, ms: float | None = None) -> dict[str, Any]:
        """Apply one fault command; returns the new status."""
        if cmd == "lose":
            self.mode = "lost"
            for link in list(self.links):
                link.close()
            self.forwarding.set()  # wake held connections so they see "lost" and close
        elif cmd == "restore":
            self.mode = "normal"
            self.forwarding.set()
        elif cmd == "hang":
            self.mode = "hung"
            self.forwarding.clear()
        elif cmd == "latency":
            if ms is None or ms < 0:
                raise ValueError("latency needs a number of milliseconds >= 0")
            self.latency_s = ms / 1000.0
        elif cmd != "status":
            raise ValueError(f"unknown fault {cmd!r}")
        return self.status()

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "latency_ms": self.latency_s * 1000.0,
            "connections": len(self.links),
            "accepted": self.accepted,
            "refused": self.refused,
        }

    async def _on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    msg = json.loads(line)
                    ms = msg.get("ms")
                    reply: dict[str, Any] = {"ok": True, **self.apply(str(msg["cmd"]), ms)}
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()


def main(argv: list[str] | None = None) -> None:
    """Run a proxy until SIGTERM."""
    parser = argparse.ArgumentParser(prog="p11guard-fault-proxy")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--control", required=True)
    opts = parser.parse_args(argv)

    async def run() -> None:
        await FaultProxy(opts.listen, opts.upstream, opts.control).serve()

    asyncio.run(run())


if __name__ == "__main__":
    main()
