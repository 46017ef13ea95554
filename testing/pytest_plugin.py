"""pytest fixtures that make the HSM fail on purpose.

Registered through the ``pytest11`` entry point: any project that installs p11guard has
them, no ``conftest.py`` needed.

- ``hsm_group_session``: one running :class:`~p11guard.testbed.Testbed` for the session,
  always torn down at the end.
- ``hsm_group``: that testbed for one test; every fault is cleared afterwards. Mark a test
  ``@pytest.mark.hsm_members(3)`` for a group of 3 members (``hsm-a``, ``hsm-b``,
  ``hsm-c``; one testbed per member count, shared by the session).
- ``guard``: a :class:`~p11guard.Guard` on it (fault injection on, short timeouts), closed
  after the test.
- ``hsm_faults``: :class:`HsmFaults` -- ``lose()``, ``restore()``, ``hang()``,
  ``latency(ms)``, ``outage(seconds)`` for the whole group or one ``member=``, and per
  worker host ``kill_host()``, ``hang_host()``, ``fail_next()``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from p11guard._guard import Guard
from p11guard.testbed._opencryptoki import claim_token
from p11guard.testbed._testbed import Testbed

__all__ = ["HsmFaults"]

#: How long a session waits for opencryptoki's machine-wide token when another session has it.
_CLAIM_WAIT_S = 900.0


class HsmFaults:
    """Faults for the group (through the testbed) and for one worker's host (through the guard).

    Args:
        bed: the running testbed.
        guard: the guard whose hosts ``kill_host``/``hang_host``/``fail_next`` act on.
    """

    def __init__(self, bed: Testbed, guard: Guard | None = None) -> None:
        self.bed = bed
        self.guard = guard

    # -- the whole group, or one member ---------------------------------------------------

    def lose(self, member: str | None = None) -> None:
        """Every member (or ``member``) gone: connections closed, new ones refused."""
        self.bed.fault("lose", member=member)

    def restore(self, member: str | None = None) -> None:
        """The group (or ``member``) answers again."""
        self.bed.fault("restore", member=member)

    def hang(self, member: str | None = None) -> None:
        """Connections stay open, nothing is answered (calls block)."""
        self.bed.fault("hang", member=member)

    def latency(self, ms: float, member: str | None = None) -> None:
        """Add ``ms`` milliseconds one way to every exchange (``0`` clears it)."""
        self.bed.fault("latency", ms, member=member)

    @property
    def members(self) -> list[str]:
        """The testbed's member names (``["hsm"]`` for a group of one)."""
        return self.bed.members

    @contextmanager
    def outage(self, seconds: float, member: str | None = None) -> Iterator[None]:
        """``with hsm_faults.outage(3): ...`` -- lose the group (or ``member``) now, restore
        it after ``seconds`` (in the background, so the body may block on the guard), and
        at the latest when the block ends."""
        restored = threading.Event()

        def restore() -> None:
            if not restored.is_set():
                restored.set()
                self.restore(member)

        self.lose(member)
        timer = threading.Timer(seconds, restore)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            restore()

    # -- one worker's host ----------------------------------------------------------------

    def _guard(self) -> Guard:
        if self.guard is None:
            raise RuntimeError("per-host faults need the `guard` fixture (or HsmFaults(bed, guard))")
        return self.guard

    def _workers(self, worker: int | None) -> list[int]:
        guard = self._guard()
        if worker is not None:
            return [worker]
        return sorted(int(name.split("-")[1]) for name in guard.host_pids() if name.startswith("worker-"))

    def kill_host(self, worker: int | None = None) -> list[int]:
        """SIGKILL the host of ``worker`` (default: every worker); returns the pids killed."""
        pids = self._guard().host_pids()
        killed = []
        for wid in self._workers(worker):
            pid = pids.get(f"worker-{wid}")
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return killed

    def hang_host(self, seconds: float, worker: int | None = None) -> None:
        """The next call of the worker's host hangs ``seconds`` inside the module call path."""
        for wid in self._workers(worker):
            self._guard().inject_fault(wid, "hang", seconds=seconds)

    def fail_next(self, ckr: int, count: int = 1, ops: list[str] | None = None, worker: int | None = None) -> None:
        """The next ``count`` calls (of ``ops``, default any) of the worker's host fail with ``ckr``."""
        for wid in self._workers(worker):
            self._guard().inject_fault(wid, "fail_next", ckr=ckr, count=count, ops=ops)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hsm_members(n): run the test's hsm_group (and guard) on a testbed of n HA members"
    )
    config.addinivalue_line(
        "markers",
        "hsm_backend(name): run the test's hsm_group (and guard) on another backend: "
        "'tpm' (a software TPM that can really be lost) or 'opencryptoki' (its soft token)",
    )


@pytest.fixture(scope="session")
def hsm_testbeds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Testbed]]:
    """``hsm_testbeds(n, backend="softhsm")``: the session's running testbed of ``n``
    members on ``backend`` (started on first use); every one is torn down at the end,
    whatever happened."""
    beds: dict[tuple[int, str], Testbed] = {}
    claims: list[int] = []

    def get(members: int, backend: str = "softhsm") -> Testbed:
        if (members, backend) not in beds:
            name = "hsm-group" if members == 1 else f"hsm-group-{members}"
            bed = Testbed(tmp_path_factory.mktemp(name if backend == "softhsm" else f"hsm-{backend}"))
            if backend == "opencryptoki":  # one machine-wide token: one session at a time
                claims.append(claim_token(_CLAIM_WAIT_S))
            beds[(members, backend)] = bed
            bed.up(members=members, backend=backend)
        return beds[(members, backend)]

    try:
        yield get
    finally:
        for bed in beds.values():
            bed.down()
        for fd in claims:
            os.close(fd)


@pytest.fixture(scope="session")
def hsm_group_session(hsm_testbeds: Callable[..., Testbed]) -> Testbed:
    """A running testbed (one member) shared by the session; torn down at the end."""
    return hsm_testbeds(1)


@pytest.fixture
def hsm_group(hsm_testbeds: Callable[..., Testbed], request: pytest.FixtureRequest) -> Iterator[Testbed]:
    """The session's testbed (of ``hsm_members(n)`` members, on ``hsm_backend(name)``),
    every fault cleared after the test."""
    members = request.node.get_closest_marker("hsm_members")
    backend = request.node.get_closest_marker("hsm_backend")
    bed = hsm_testbeds(
        int(members.args[0]) if members and members.args else 1,
        str(backend.args[0]) if backend and backend.args else "softhsm",
    )
    yield bed
    if bed.backend == "tpm":
        bed.fault("restore")
    elif bed.backend == "softhsm" and (bed.is_up or bed.members):
        bed.fault("restore")
        bed.fault("latency", 0)
        bed.fault("start-server")


@pytest.fixture
def guard(hsm_group: Testbed) -> Iterator[Guard]:
    """A Guard on the testbed: 2 workers, fault injection on, timeouts short enough for tests."""
    config = hsm_group.client_config()
    g = Guard(config)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def hsm_faults(hsm_group: Testbed, request: pytest.FixtureRequest) -> HsmFaults:
    """Faults on the testbed, and on the hosts of the ``guard`` fixture if the test uses it."""
    g: Any = request.getfixturevalue("guard") if "guard" in request.fixturenames else None
    return HsmFaults(hsm_group, g)
