"""What host processes print (the module's own logging) goes to the ``p11guard.host`` logger.

A PKCS#11 module may log to stdout/stderr by the hundred in an outage (tpm2-pkcs11 prints
3 lines per failing call). A host's two streams share one pipe; one daemon thread per
process reads every host's pipe and logs the first lines of each burst, then how many were
left out -- never straight to the user's terminal, never a pipe left full (a module
blocked on a full pipe would hang).
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from typing import IO, Any

__all__ = ["BURST_LINES", "HostOutput"]

log = logging.getLogger("p11guard.host")

#: Lines of one host logged per burst (a second with output); the rest are counted.
BURST_LINES = 3
_BURST_S = 1.0


class _Source:
    def __init__(self, stream: IO[bytes], owner: Any) -> None:
        self.stream = stream
        self.owner = owner  # the HostProcess: its name may change (a spare becomes a worker)
        self.partial = b""
        self.window = 0.0
        self.logged = 0
        self.left_out = 0

    def who(self) -> str:
        return f"host {getattr(self.owner, 'name', '?')} (pid {getattr(self.owner, 'pid', '?')})"

    def line(self, text: bytes) -> None:
        now = time.monotonic()
        if now - self.window > _BURST_S:
            self.flush()
            self.window, self.logged = now, 0
        if self.logged < BURST_LINES:
            self.logged += 1
            log.warning("%s: %s", self.who(), text.decode("utf-8", "replace").rstrip())
        else:
            self.left_out += 1

    def flush(self) -> None:
        if self.left_out:
            log.warning("%s: %d more lines of module output left out", self.who(), self.left_out)
            self.left_out = 0


class HostOutput:
    """The one reader of every host's output pipe in this process."""

    _shared: HostOutput | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> HostOutput:
        with cls._shared_lock:
            if cls._shared is None or cls._shared._pid != os.getpid():
                cls._shared = cls()
            return cls._shared

    @classmethod
    def _after_fork_in_child(cls) -> None:
        # The parent's reader thread is not in the child (shared() starts one there) and
        # one of its threads may have held the lock at the fork.
        cls._shared_lock = threading.Lock()
        cls._shared = None

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: list[_Source] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="p11guard-host-output", daemon=True)
        self._thread.start()

    def watch(self, stream: IO[bytes], owner: Any) -> None:
        """Read ``stream`` (a host's stdout+stderr) until EOF; it is closed then."""
        with self._lock:
            self._pending.append(_Source(stream, owner))
        os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                source: _Source | None = key.data
                if source is None:
                    os.read(self._wake_r, 4096)
                    with self._lock:
                        pending, self._pending = self._pending, []
                    for new in pending:
                        self._selector.register(new.stream.fileno(), selectors.EVENT_READ, new)
                    continue
                try:
                    data = os.read(key.fd, 65536)
                except OSError:
                    data = b""
                if not data:  # EOF: the host and everything it started are gone
                    self._selector.unregister(key.fd)
                    if source.partial:
                        source.line(source.partial)
                    source.flush()
                    source.stream.close()
                    continue
                *lines, source.partial = (source.partial + data).split(b"\n")
                for text in lines:
                    if text.strip():
                        source.line(text)


os.register_at_fork(after_in_child=HostOutput._after_fork_in_child)
