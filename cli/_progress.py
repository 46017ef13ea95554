"""Progress for long runs: rich on a terminal, plain periodic lines otherwise, or nothing."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

__all__ = ["Progress", "make_progress"]


class Progress(Protocol):
    """What a long run reports as it goes."""

    def update(self, done: int, state: str, recoveries: int) -> None: ...

    def close(self) -> None: ...


class _Null:
    def update(self, done: int, state: str, recoveries: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Plain:
    """One line every ``every_s`` seconds (and at every state change; what follows `` -- ``
    in the state is detail that does not count as a change): for logs and pipes."""

    def __init__(self, total: int, label: str, stream: TextIO, every_s: float = 2.0) -> None:
        self.total = total
        self.label = label
        self.stream = stream
        self.every_s = every_s
        self.start = time.monotonic()
        self.last = 0.0
        self.state = ""
        self.done = 0

    def update(self, done: int, state: str, recoveries: int) -> None:
        now = time.monotonic()
        self.done = done
        # a change of the state proper prints at once; details after " -- " wait their turn
        proper = state.split(" -- ", 1)[0]
        if now - self.last < self.every_s and proper == self.state:
            return
        self.last, self.state = now, proper
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f} s" if eta != float("inf") else "?"
        print(
            f"{self.label}: {done}/{self.total} ({rate:.0f}/s, ETA {eta_text}) group {state}, recoveries {recoveries}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        pass


class _Rich:
    def __init__(self, total: int, label: str, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[state]}"),
            console=Console(file=stream),
            transient=False,
        )
        self._start = time.monotonic()
        self._task: Any = self._progress.add_task(label.replace("signing with ", ""), total=total, rate="", state="")
        self._progress.start()

    def update(self, done: int, state: str, recoveries: int) -> None:
        rate = done / max(time.monotonic() - self._start, 1e-9)
        word = state.split(" ", 1)[0]  # "SERVING (2/3 members)"
        color = "green" if word == "SERVING" else "yellow" if word == "SUSPECT" else "red"
        self._progress.update(
            self._task,
            completed=done,
            rate=f"{rate:,.0f}/s",
            state=f"[{color}]{state}[/] recoveries {recoveries}",
        )

    def close(self) -> None:
        self._progress.stop()


def make_progress(total: int, label: str, quiet: bool, stream: TextIO | None = None) -> Progress:
    """rich on a terminal, plain periodic lines when not, nothing with ``quiet``."""
    out = stream or sys.stderr
    if quiet:
        return _Null()
    if out.isatty():
        return _Rich(total, label, out)
    return _Plain(total, label, out)
