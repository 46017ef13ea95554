"""Process helpers of the testbed: is it alive, stop its tree, wait for it, private files.

The testbed starts daemons (p11-kit servers, proxies, pkcsslotd, swtpm...) and stops them
by pid -- never by name -- with the create time checked, so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from p11guard.base import P11GuardError, poll_until

__all__ = ["TestbedError", "alive", "read_state", "stop_tree", "wait_for", "write_private", "write_state"]


class TestbedError(P11GuardError):
    """The testbed cannot do what was asked; the message says what to do."""

    __test__ = False  # not a pytest test class


def alive(pid: int | None, created: float | None) -> bool:
    """Whether ``pid`` runs and is the process created at ``created`` (not a recycled pid)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (created is None or abs(proc.create_time() - created) < 0.01)
    except psutil.Error:
        return False


def stop_tree(pid: int | None, created: float | None, timeout: float = 5.0) -> None:
    """Stop a process and all its descendants, by pid: SIGTERM, then SIGKILL after a deadline."""
    if not alive(pid, created):
        return
    assert pid is not None
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, left = psutil.wait_procs(procs, timeout=timeout / 2)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=timeout / 2)


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``cond`` with a deadline; :class:`TestbedError` names what did not happen."""
    poll_until(cond, timeout, what, TestbedError)


def write_private(path: Path, value: str) -> None:
    """Write a secret (a PIN) to a file only its owner can read (mode 0600 from creation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")


def read_state(path: Path) -> dict[str, Any]:
    """A state file's JSON object; ``{}`` when it is missing or not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write a state file atomically (another process may read it at any moment)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)
