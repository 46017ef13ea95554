"""The fault proxy: Unix socket to Unix socket, with the faults of a network HSM group.

Run as its own process (``python -m p11guard.testbed._proxy``); controlled through a
second Unix socket with one JSON object per line:
``{"cmd": "lose" | "restore" | "hang" | "latency" | "status", "ms": N}``.

- ``lose``: close every client connection, refuse new ones (the whole group is gone).
- ``restore``: accept again and forward normally.
- ``hang``: keep connections open but forward nothing, either way; new connections are
  accepted and never answered.
- ``latency MS``: add MS ms one way to every chunk in each direction, order kept.

The proxy's event loop waits with ``select()`` (:func:`event_loop`), not epoll: epoll takes
its timeout in whole milliseconds, rounded up, so a chunk due 0.3 ms after the loop's last
wake-up left 0.7 ms late, and the more connections, the more such wake-ups -- a 1 ms
latency made a round trip of 2.3 ms on one connection and 3.3-3.5 ms on 16 (an echo
through the proxy); with ``select()`` it is 2.4-2.5 ms on 1 to 16, as on a network, where
another client's traffic does not slow yours (``scripts/bench`` measures it: the network
floor). ``select()`` watches descriptors below ``FD_SETSIZE`` (1024) only, so :func:`main`
caps the process's open files there: a storm of connections meets EMFILE, which asyncio
survives (it pauses accepting for a second; a failed upstream connect drops that link),
instead of a descriptor ``select()`` cannot watch, which would stop the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import selectors
import signal
from collections import deque
from typing import Any

__all__ = ["FaultProxy", "event_loop", "main"]

#: Bytes buffered toward one side before reading from the other pauses.
_HIGH_WATER = 1 << 20
#: Chunks due this soon after the one whose timer fired go with it: the pieces of one
#: message, written microseconds apart, travel together (a timer of their own would cost
#: a wake-up and a write each).
_TOGETHER_S = 0.0002
#: ``select()`` watches descriptors below this (glibc's FD_SETSIZE).
_SELECT_FDS = 1024


class _Flow:
    """Bytes one way: each chunk held until it is due (latency) and while the group hangs,
    in order; the chunks due at once leave in one write."""

    __slots__ = ("done", "dst", "eof", "pending", "timer")

    def __init__(self) -> None:
        self.pending: deque[tuple[float, bytes]] = deque()
        self.dst: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.eof = False  # the source has ended: half-close ``dst`` once pending is delivered
        self.done = False  # nothing more goes this way


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client
        self.upstream: asyncio.Transport | None = None
        self.to_upstream = _Flow()
        self.to_client = _Flow()
        self.to_client.dst = client
        self.connecting: asyncio.Task[None] | None = None
        self.closed = False

    def close(self, abort: bool = True) -> None:
        """Close both ends: at once (``lose``), or after what is buffered (an end closed)."""
        if self.closed:
            return
        self.closed = True
        for flow in (self.to_upstream, self.to_client):
            if flow.timer is not None:
                flow.timer.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.abort() if abort else transport.close()


class _End(asyncio.Protocol):
    """One end of a link: what it receives goes into ``out``, toward the other end."""

    def __init__(self, proxy: FaultProxy, link: _Link | None, out: _Flow | None) -> None:
        self.proxy = proxy
        self.link = link
        self.out = out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.link is None:  # a client: the proxy's listening side
            assert isinstance(transport, asyncio.Transport)
            self.link, self.out = self.proxy.accept(transport)

    def data_received(self, data: bytes) -> None:
        if self.link is not None and self.out is not None:
            self.proxy.forward(self.link, self.out, data)

    def eof_received(self) -> bool:
        self._ended()
        return True  # a half-close: the other way may still answer; the link closes when both end

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None and self.out is not None:
            into = self.link.to_client if self.out is self.link.to_upstream else self.link.to_upstream
            into.done = True  # this end is gone: nothing can be written to it any more
        self._ended()

    def _ended(self) -> None:
        if self.link is not None and self.out is not None and not self.out.eof:
            self.out.eof = True
            if self.out.timer is None:  # else the pending timer ends the flow after the last chunk
                self.proxy.flush(self.link, self.out)

    def _source(self) -> asyncio.Transport | None:
        """The transport whose bytes this end writes (the other end)."""
        if self.link is None:
            return None
        return self.link.client if self.out is self.link.to_client else self.link.upstream

    def pause_writing(self) -> None:
        if (src := self._source()) is not None:
            src.pause_reading()

    def resume_writing(self) -> None:
        if (src := self._source()) is not None and not self.link.closed:  # type: ignore[union-attr]
            src.resume_reading()


class FaultProxy:
    """Forwards bytes between clients and the p11-kit server, and injects faults.

    Plain protocols and timers, no task per chunk: the proxy stands in for a network,
    which costs a client nothing but time, so it should cost the machine little CPU.
    """

    def __init__(self, listen: str, upstream: str, control: str) -> None:
        self.listen_path = listen
        self.upstream_path = upstream
        self.control_path = control
        self.mode = "normal"
        self.latency_s = 0.0
        self.links: set[_Link] = set()
        self.forwarding = asyncio.Event()
        self.forwarding.set()
        self.listening = asyncio.Event()  # set once both sockets accept
        self.accepted = 0
        self.refused = 0

    async def serve(self) -> None:
        for path in (self.listen_path, self.control_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _End(self, None, None), self.listen_path)
        control = await asyncio.start_unix_server(self._on_control, self.control_path)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server, control:
            self.listening.set()
            await stop.wait()
        for link in list(self.links):
            link.close()
        for path in (self.listen_path, self.control_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- data path ----------------------------------------------------------------------

    def accept(self, client: asyncio.Transport) -> tuple[_Link, _Flow]:
        link = _Link(client)
        if self.mode == "lost":
            self.refused += 1
            link.close()
            return link, link.to_upstream
        self.accepted += 1
        self.links.add(link)
        link.connecting = asyncio.ensure_future(self._connect(link))
        return link, link.to_upstream

    async def _connect(self, link: _Link) -> None:
        await self.forwarding.wait()  # a connection made during a hang is never answered
        if self.mode == "lost" or link.closed:
            self._drop(link)
            return

        def upstream_end() -> _End:
            return _End(self, link, link.to_client)

        try:
            upstream, _ = await asyncio.get_running_loop().create_unix_connection(upstream_end, self.upstream_path)
        except OSError:
            self._drop(link)  # server down: the client sees the connection close
            return
        link.connecting = None
        if link.closed:
            upstream.abort()
            return
        link.upstream = link.to_upstream.dst = upstream
        for transport in (upstream, link.client):
            transport.set_write_buffer_limits(_HIGH_WATER)
        self.flush(link, link.to_upstream)  # what the client sent meanwhile

    def _drop(self, link: _Link, abort: bool = True) -> None:
        link.connecting = None
        link.close(abort)
        self.links.discard(link)

    def forward(self, link: _Link, flow: _Flow, data: bytes) -> None:
        flow.pending.append((asyncio.get_running_loop().time() + self.latency_s, data))
        if flow.timer is None:
            self.flush(link, flow)

    def flush(self, link: _Link, flow: _Flow) -> None:
        """Write what is due; wake again for the next chunk; close after the last one."""
        flow.timer = None
        if link.closed or flow.dst is None or not self.forwarding.is_set():
            return  # held: the connection, or ``restore``, flushes again
        loop = asyncio.get_running_loop()
        now = loop.time() + _TOGETHER_S
        due: list[bytes] = []
        while flow.pending and flow.pending[0][0] <= now:
            due.append(flow.pending.popleft()[1])
        if due:
            flow.dst.write(due[0] if len(due) == 1 else b"".join(due))
        if flow.pending:
            flow.timer = loop.call_at(flow.pending[0][0], self.flush, link, flow)
        elif flow.eof and not flow.done:
            flow.done = True
            if flow.dst.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    flow.dst.write_eof()
        if link.to_upstream.done and link.to_client.done:
            self._drop(link, abort=False)

    # -- control ------------------------------------------------------------------------

    def apply(self, cmd: str, ms: float | None = None) -> dict[str, Any]:
        """Apply one fault command; returns the new status."""
        if cmd == "lose":
            self.mode = "lost"
            for link in list(self.links):
                self._drop(link)
            self.forwarding.set()  # wake held connections so they see "lost" and close
        elif cmd == "restore":
            self.mode = "normal"
            self.forwarding.set()
            for link in list(self.links):  # what the hang held, in order
                for flow in (link.to_upstream, link.to_client):
                    if flow.timer is None:
                        self.flush(link, flow)
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

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > _SELECT_FDS:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_SELECT_FDS, hard))
    with asyncio.Runner(loop_factory=event_loop) as runner:
        runner.run(run())


def event_loop() -> asyncio.AbstractEventLoop:
    """The proxy's event loop: timers to the microsecond (see the module's docstring)."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


if __name__ == "__main__":
    main()
