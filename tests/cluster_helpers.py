"""Helpers for the Dask tests: a local cluster started and stopped by pid, a job in a thread."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from distributed import Client

from conftest import gone, wait_until
from p11guard.cli._signreport import SignReport
from p11guard.cluster import PLUGIN_NAME, sign_on_cluster, worker_view
from p11guard.cluster._connect import local_cluster


class Cluster:
    """A LocalCluster of ``workers`` processes (each under a Nanny) and a client on it.

    Every worker pid ever seen, and every host pid of their guards, is remembered; ``close``
    closes the cluster, then waits for each of those pids to be gone (killing a leftover by
    its pid, and failing the test for it)."""

    def __init__(self, workers: int = 2) -> None:
        self.size = workers
        self.cluster = local_cluster(workers)
        self.client = Client(self.cluster)
        self.pids: set[int] = set()
        self.ready()

    def worker_pids(self) -> dict[str, int]:
        pids: dict[str, int] = self.client.run(os.getpid)
        self.pids.update(pids.values())
        return pids

    def ready(self) -> None:
        """Every worker up (a killed one is restarted by its Nanny)."""
        self.client.wait_for_workers(self.size, timeout=60)
        wait_until(lambda: len(self.worker_pids()) == self.size, 60, "every worker up")

    def views(self) -> dict[str, dict[str, Any]]:
        """Each worker's guard (while a plugin is registered); remembers every pid seen."""
        views: dict[str, dict[str, Any]] = self.client.run(worker_view, plugin=PLUGIN_NAME, on_error="return")
        out = {a: v for a, v in views.items() if isinstance(v, dict)}
        for view in out.values():
            self.pids.update(view.get("hosts", {}).values())
            if view.get("pid"):
                self.pids.add(view["pid"])
        return out

    def kill_worker(self, address: str) -> tuple[int, list[int]]:
        """``kill -9`` the worker process at ``address``; its pid and its hosts' pids."""
        view = self.views()[address]
        os.kill(view["pid"], signal.SIGKILL)
        return view["pid"], list(view.get("hosts", {}).values())

    def close(self) -> None:
        try:
            self.worker_pids()
        except Exception:
            pass
        self.client.close()
        self.cluster.close()
        left = []
        for pid in sorted(self.pids):
            try:
                wait_until(lambda pid=pid: gone(pid), 10, f"process {pid} to be gone")
            except AssertionError:
                left.append(pid)
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left after the cluster closed: {left}"


class Job(threading.Thread):
    """``sign_on_cluster`` in a thread: ``report`` or ``error`` when it ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.args, self.kwargs = args, kwargs
        self.report: SignReport | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.report = sign_on_cluster(*self.args, **self.kwargs)
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float) -> SignReport:
        self.join(timeout)
        assert not self.is_alive(), f"the job did not end within {timeout} s"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


def parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.jsonl"))


def descendants() -> set[int]:
    """Pids of this process's descendants now."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


class Descendants(threading.Thread):
    """Samples this process's descendants every 50 ms until stopped: what a job started."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.before = descendants()
        self.seen: dict[int, str] = {}  #: pid: command line
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for pid in descendants() - self.before - set(self.seen):
                try:
                    self.seen[pid] = " ".join(psutil.Process(pid).cmdline())
                except psutil.Error:
                    self.seen[pid] = "?"

    def __enter__(self) -> Descendants:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(5)


def records(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "records.txt"
    path.write_text("".join(f"record number {i}\n" for i in range(1, n + 1)))
    return path


def all_gone(pids: Iterator[int] | list[int] | set[int], timeout: float, what: str) -> None:
    for pid in pids:
        wait_until(lambda pid=pid: gone(pid), timeout, f"{what} {pid} to be gone")
