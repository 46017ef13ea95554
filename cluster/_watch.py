"""The driver's view of its workers: one progress line, and per-worker figures for the report.

A thread asks every worker for its guard's state (``Client.run``, cheap: no actor is
asked) about once a second and feeds the p11guard progress line: records, rate, partitions,
workers and each worker's group state. The driver feeds it too, as partitions complete
(from ``as_completed``). At the end, :meth:`Watch.finish` asks each worker for its outages
and keeps the last view of workers that died on the way.
"""

from __future__ import annotations

import threading
from typing import Any

from distributed import Client

from p11guard.cli._progress import Progress
from p11guard.cluster._task import worker_view

__all__ = ["Watch"]

#: Worst first: the progress line's first word is the worst state among the workers.
_RANK = {"FAILED": 0, "NONE": 1, "LOST": 2, "RECOVERING": 3, "SUSPECT": 4, "SERVING": 5, "CLOSED": 6}


class Watch:
    """Polls the workers' guards and keeps the progress line up to date."""

    def __init__(self, client: Client, plugin: str, progress: Progress, partitions: int, every_s: float = 1.0) -> None:
        self.client, self.plugin, self.progress = client, plugin, progress
        self.partitions = partitions
        self.every_s = every_s
        self.lock = threading.Lock()
        self._progress_lock = threading.Lock()  # the progress line is fed from two threads
        self.views: dict[str, dict[str, Any]] = {}  #: by worker address, the latest
        self.done_records = 0
        self.parts_done = 0
        self.parts_failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p11guard-dask-watch", daemon=True)

    def start(self) -> Watch:
        self.poll()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception:  # the cluster is closing: the driver notices on its own
                pass
            self.tick()

    def poll(self, full: bool = False) -> None:
        answers = self.client.run(worker_view, plugin=self.plugin, full=full, on_error="return")
        with self.lock:
            for address in self.views:
                self.views[address]["alive"] = False
            for address, view in answers.items():
                if isinstance(view, dict):
                    self.views[address] = {**self.views.get(address, {}), **view, "alive": True}

    def record(self, records: int, failed: bool = False) -> None:
        """A partition ended (``records`` signed or skipped with it)."""
        with self.lock:
            self.done_records += records
            if failed:
                self.parts_failed += 1
            else:
                self.parts_done += 1
        self.tick()

    def state_text(self) -> str:
        with self.lock:
            alive = sorted(
                ((v.get("name", a), str(v.get("state", "NONE"))) for a, v in self.views.items() if v.get("alive")),
            )
            failed = f", {self.parts_failed} failed" if self.parts_failed else ""
            parts = f"partitions {self.parts_done}/{self.partitions}{failed}"
        worst = min((s for _, s in alive), key=lambda s: _RANK.get(s, 0), default="NONE")
        states = ", ".join(f"{name} {state}" for name, state in alive)
        return f"{worst} -- {parts}, {len(alive)} workers: {states}"

    def recoveries(self) -> int:
        with self.lock:
            return sum(int(v.get("recoveries", 0)) for v in self.views.values())

    def tick(self) -> None:
        text, recoveries = self.state_text(), self.recoveries()
        with self.lock:
            done = self.done_records
        with self._progress_lock:
            self.progress.update(done, text, recoveries)

    def finish(self) -> dict[str, dict[str, Any]]:
        """Stop polling; each worker's figures for the report (a dead worker's from its
        last answer, ``gone: true``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        try:
            self.poll(full=True)
        except Exception:
            pass
        out: dict[str, dict[str, Any]] = {}
        with self.lock:
            for address, v in sorted(self.views.items(), key=lambda item: (str(item[1].get("name")), item[0])):
                outages = v.get("outages") or []
                out[address] = {
                    "name": v.get("name"),
                    "pid": v.get("pid"),
                    "state": v.get("state"),
                    "recoveries": int(v.get("recoveries", 0)),
                    "outages": len(outages),
                    "outage_s": round(sum(float(o.get("duration_s") or 0.0) for o in outages), 3),
                    "guards_started": v.get("guards_started", 0),
                    "gone": not v.get("alive", False),
                }
        return out
