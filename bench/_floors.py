"""What this machine allows: where each operation's CPU goes, and the floors under it.

The service goals are rates on this machine's cores, so each operation has a CPU budget
(cores / the goal's rate). Measured in the same run as the goals:

- :class:`CpuWindow`: CPU per operation of the guard's process, its hosts and the
  testbed's HSM side (proxy, p11-kit server and its per-connection children) over a
  case's measured window, and the machine's idle time.
- ``handoff``: CPU per result handed to one of 16 blocking threads by a thread that
  serves them in bursts -- plain Python, no crypto, no pipe: the least a blocking
  caller's result costs in CPython here (a kernel wake-up and a GIL hand-off).
- ``module`` (a case in :mod:`bench._cases`, beside direct PyKCS11): CPU of the module's
  own ``C_SignInit`` + ``C_Sign`` per signature, in-process through ctypes (the host's
  fast path): the least the hosts spend.
- ``network``: the testbed's network alone -- round trips of 100 bytes through the fault
  proxy (``latency`` ms one way) to an echo server, on one connection and on several at
  once: what the latency-bound cases' network costs a connection, with no HSM behind it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["CpuWindow", "case_handoff", "case_network"]


def _tree_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes; for each top of the tree also its reaped children
    (p11-kit server forks a child per connection, which exits with it)."""
    import psutil

    total, alive = 0.0, set(pids)
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            t = proc.cpu_times()
            total += t.user + t.system
            if proc.ppid() not in alive:
                total += t.children_user + t.children_system
    return total


class CpuWindow:
    """CPU seconds by kind of process from ``start_s`` for ``seconds``, taken on a thread of
    the case's own process (the guard's process, its hosts, the testbed's HSM side)."""

    def __init__(self, bed_dir: str | None, host_pids: list[int], start_s: float, seconds: float) -> None:
        self._bed_dir, self._hosts = bed_dir, host_pids
        self._marks: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start_s, seconds), daemon=True)
        self._thread.start()

    def _snapshot(self) -> tuple[float, dict[str, float]]:
        import psutil

        from p11guard.testbed import Testbed

        bed = Testbed(self._bed_dir).pids() if self._bed_dir else []
        me = psutil.Process().cpu_times()
        return time.monotonic(), {
            "parent": me.user + me.system,
            "hosts": _tree_cpu(self._hosts),
            "hsm_side": _tree_cpu(bed),
            "idle": psutil.cpu_times().idle,
        }

    def _run(self, start_s: float, seconds: float) -> None:
        # A window of time, not a condition: waiting out the warm-up is the measurement.
        if self._stop.wait(start_s):
            return
        self._marks.append(self._snapshot())
        if not self._stop.wait(seconds):
            self._marks.append(self._snapshot())

    def per_op(self, ops_per_s: float) -> dict[str, float]:
        """Microseconds of CPU per operation by kind, and idle % of all cores."""
        self._thread.join(timeout=10.0)  # the window ends as the case does (give or take a snapshot)
        self._stop.set()
        if len(self._marks) < 2 or ops_per_s <= 0:
            return {}
        (t0, a), (t1, b) = self._marks
        ops = ops_per_s * (t1 - t0)
        out = {k: round((b[k] - a[k]) / ops * 1e6, 1) for k in ("parent", "hosts", "hsm_side")}
        out["idle_pct"] = round((b["idle"] - a["idle"]) / (t1 - t0) / (os.cpu_count() or 1) * 100, 1)
        return out


def case_handoff(a: dict[str, Any]) -> dict[str, Any]:
    """``threads`` callers each hand a lock to a serving thread and block on it; the server
    releases every waiting lock in one burst, as a worker settles a frame."""
    threads, seconds = int(a.get("threads", 16)), float(a["seconds"])
    waiting: collections.deque[Any] = collections.deque()
    cond = threading.Condition(threading.Lock())
    stop = threading.Event()
    counts = [0] * threads

    def server() -> None:
        while not stop.is_set():
            with cond:
                while not waiting and not stop.is_set():
                    cond.wait(0.1)
                burst = list(waiting)
                waiting.clear()
            for lock in burst:
                lock.release()

    def caller(i: int) -> None:
        while not stop.is_set():
            lock = threading.Lock()
            lock.acquire()
            with cond:
                waiting.append(lock)
                cond.notify()
            lock.acquire()
            counts[i] += 1

    # Daemon threads: the case's process exits once it has printed its figures, and a
    # caller blocked on its lock when the window closes goes with it.
    workers = [threading.Thread(target=server, daemon=True)]
    workers += [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    stop.wait(float(a["warmup"]))
    n0, c0, t0 = sum(counts), time.process_time(), time.perf_counter()
    stop.wait(seconds)
    n1, c1, t1 = sum(counts), time.process_time(), time.perf_counter()
    stop.set()
    ops = n1 - n0
    return {"ops_per_s": ops / (t1 - t0), "cpu_us_per_op": round((c1 - c0) / max(ops, 1) * 1e6, 1)}


#: An echo server with a process per connection, as p11-kit server has; it listens under a
#: temporary name and renames its socket into place, so that the path is there once it
#: accepts.
_ECHO = """
import os, signal, socket, sys
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps each connection's child
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1] + ".new")
srv.listen(64)
os.rename(sys.argv[1] + ".new", sys.argv[1])
while True:
    conn, _ = srv.accept()
    if os.fork() == 0:
        srv.close()
        while data := conn.recv(65536):
            conn.sendall(data)
        os._exit(0)
    conn.close()
"""


def case_network(a: dict[str, Any]) -> dict[str, Any]:
    """Median round trip through the fault proxy with ``latency_ms``, on 1 connection and on
    ``connections`` at once (a blocking client thread each: their GIL hand-offs are in the
    figure, ~0.05 ms at 16)."""
    from p11guard.testbed._network import start_proxy
    from p11guard.testbed._procs import stop_tree, wait_for
    from p11guard.testbed._proxy_control import proxy_control

    seconds, n = float(a["seconds"]), int(a["connections"])
    with tempfile.TemporaryDirectory(prefix="p11guard-net-") as tmp, contextlib.ExitStack() as stack:
        member: dict[str, Any] = {
            name: os.path.join(tmp, f"{name}.sock") for name in ("proxy_socket", "server_socket", "control_socket")
        }
        with open(os.path.join(tmp, "echo.log"), "wb") as log:
            echo = subprocess.Popen(
                [sys.executable, "-c", _ECHO, member["server_socket"]],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        stack.callback(echo.wait, 5)  # runs last: stop_tree below has stopped it (and its children)
        stack.callback(stop_tree, echo.pid, None)
        member["name"] = "hsm"
        start_proxy(Path(tmp), member, lambda: None)
        stack.callback(stop_tree, member["proxy_pid"], member["proxy_created"])

        def ready() -> bool:
            if echo.poll() is not None:
                raise RuntimeError(f"the echo server exited: {Path(tmp, 'echo.log').read_text()[-500:]}")
            return os.path.exists(member["server_socket"]) and os.path.exists(member["control_socket"])

        wait_for(ready, 10, "the echo server and the fault proxy")
        proxy_control(member["control_socket"], {"cmd": "latency", "ms": a["latency_ms"]})
        return {f"rtt_ms_{k}_connections": _round_trips(member["proxy_socket"], k, seconds) for k in (1, n)}


def _round_trips(listen: str, connections: int, seconds: float) -> float:
    """Median ms of 100-byte round trips from ``connections`` clients at once for ``seconds``."""
    samples: list[list[float]] = [[] for _ in range(connections)]
    errors: list[BaseException] = []
    end = time.perf_counter() + seconds

    def client(mine: list[float]) -> None:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(listen)
                while (start := time.perf_counter()) < end:
                    sock.sendall(b"x" * 100)
                    got = 0
                    while got < 100:
                        if not (chunk := sock.recv(65536)):
                            raise ConnectionError("the fault proxy closed the connection")
                        got += len(chunk)
                    mine.append(time.perf_counter() - start)
        except BaseException as exc:  # re-raised below, in the case's own thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(mine,)) for mine in samples]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return round(statistics.median(x for mine in samples for x in mine) * 1e3, 3)
