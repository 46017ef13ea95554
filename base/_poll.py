"""Waiting for a condition: poll it with a deadline, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["poll_until"]


def poll_until(
    cond: Callable[[], object],
    timeout: float,
    what: str,
    error: type[Exception] = TimeoutError,
    *,
    first_delay: float = 0.005,
    max_delay: float = 0.1,
) -> None:
    """Call ``cond`` until it is true; raise ``error("timed out after ... waiting for <what>")``.

    The delay between calls doubles from ``first_delay`` up to ``max_delay``: cheap when the
    condition comes true at once, gentle when it takes seconds.
    """
    end = time.monotonic() + timeout
    delay = first_delay
    while not cond():
        if time.monotonic() > end:
            raise error(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, max_delay)
