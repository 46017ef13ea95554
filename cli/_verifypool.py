"""Run ``p11guard verify``'s tasks on every core, and hand the results back in order.

Tasks are gathered into chunks (:data:`CHUNK_TASKS` tasks or :data:`CHUNK_BYTES`); with
``jobs`` > 1 the chunks go to a pool of that many processes (``spawn``: nothing of this
process is shared), at most ``3 * jobs`` chunks and :data:`WINDOW_BYTES` in flight. Results
are handed to ``done`` in the order the tasks were added, whatever the order the processes
finish in, so the report is the same for any ``jobs``. An input of one chunk or less is
checked here, without starting a pool.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Generic, TypeVar

from p11guard.cli._verifywork import Task, check_chunk, check_tasks, init

__all__ = ["CHUNK_BYTES", "CHUNK_TASKS", "WINDOW_BYTES", "Checker"]

CHUNK_TASKS = 512
CHUNK_BYTES = 4 * 1024 * 1024
#: At most this much record data in chunks not yet handed back.
WINDOW_BYTES = 32 * 1024 * 1024

M = TypeVar("M")


class Checker(Generic[M]):
    """Checks tasks in chunks, in order; ``done(meta, codes)`` gets each task's result.

    Use as a context manager: leaving it ends the pool (and drops work not handed back).
    """

    def __init__(
        self, jobs: int, pem: bytes, public_key: Any, fingerprint: str, done: Callable[[M, tuple[int, ...]], None]
    ) -> None:
        self.jobs = jobs
        self.pem, self.public_key, self.fingerprint = pem, public_key, fingerprint
        self.done = done
        self._metas: list[M] = []
        self._tasks: list[Task] = []
        self._bytes = 0
        self._window: deque[tuple[list[M], Future[list[tuple[int, ...]]] | list[Task], int]] = deque()
        self._in_flight = 0
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Checker[M]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def add(self, meta: M, task: Task) -> None:
        self._metas.append(meta)
        self._tasks.append(task)
        self._bytes += len(task[0] or b"") + sum(len(line) for line in task[1])
        if len(self._tasks) >= CHUNK_TASKS or self._bytes >= CHUNK_BYTES:
            self._submit()

    def finish(self) -> None:
        """Check what is left and hand every result back."""
        if self._tasks:
            self._submit()
        while self._window:
            self._hand_back()

    def _submit(self) -> None:
        metas, tasks, size = self._metas, self._tasks, self._bytes
        self._metas, self._tasks, self._bytes = [], [], 0
        work: Future[list[tuple[int, ...]]] | list[Task] = tasks  # held until a second chunk comes
        if self.jobs > 1 and (self._pool is not None or self._window):
            pool = self._start_pool()
            if self._window and isinstance(self._window[0][1], list):  # the first chunk, held
                first_metas, first_tasks, first_size = self._window.popleft()
                assert isinstance(first_tasks, list)
                self._window.appendleft((first_metas, pool.submit(check_chunk, first_tasks), first_size))
            work = pool.submit(check_chunk, tasks)
        self._window.append((metas, work, size))
        self._in_flight += size
        held_first = self.jobs > 1 and self._pool is None and len(self._window) == 1
        while (
            self._window
            and not held_first
            and (len(self._window) > 3 * self.jobs or self._in_flight > WINDOW_BYTES or self.jobs == 1)
        ):
            self._hand_back()

    def _start_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=init,
                initargs=(self.pem, self.fingerprint),
            )
        return self._pool

    def _hand_back(self) -> None:
        metas, work, size = self._window.popleft()
        self._in_flight -= size
        results = check_tasks(work, self.public_key, self.fingerprint) if isinstance(work, list) else work.result()
        for meta, codes in zip(metas, results, strict=True):
            self.done(meta, codes)
