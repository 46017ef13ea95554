"""Futures of the guard's threads awaited from asyncio (p11guard._aio), in-process."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from p11guard import UserError
from p11guard._aio import LoopBridge, awaitable


def _running() -> Future[Any]:
    future: Future[Any] = Future()
    future.set_running_or_notify_cancel()
    return future


def test_completions_from_another_thread_reach_the_loop_in_one_wake_up(monkeypatch: pytest.MonkeyPatch) -> None:
    flushes = []
    flush = LoopBridge._flush
    monkeypatch.setattr(LoopBridge, "_flush", lambda self: (flushes.append(1), flush(self)))

    async def main() -> list[Any]:
        futures = [_running() for _ in range(100)]
        waiters = [awaitable(f) for f in futures]

        def complete() -> None:
            for i, f in enumerate(futures):
                if i == 7:
                    f.set_exception(UserError("no such key", kind="user", name="key_not_found"))
                else:
                    f.set_result(i)

        worker = threading.Thread(target=complete)
        worker.start()
        worker.join()  # the loop is blocked meanwhile: every completion waits for one flush
        waiters[3].cancel()  # a caller gave up: its result is dropped, the others still come
        return await asyncio.gather(*waiters, return_exceptions=True)

    results = asyncio.run(main())
    assert flushes == [1]
    assert isinstance(results[3], asyncio.CancelledError)
    assert isinstance(results[7], UserError) and results[7].name == "key_not_found"
    assert [r for i, r in enumerate(results) if i not in (3, 7)] == [i for i in range(100) if i not in (3, 7)]


def test_a_future_done_before_it_is_awaited_and_one_per_loop() -> None:
    done = _running()
    done.set_result(b"early")

    async def main() -> bytes:
        return await awaitable(done)

    assert asyncio.run(main()) == b"early"
    assert asyncio.run(main()) == b"early"  # a second loop gets its own bridge
