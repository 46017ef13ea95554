"""pytest fixtures for a running simulated HSM group.

Registered through the ``pytest11`` entry point, so any project that installs p11guard
can use them:

- ``hsm_group_session``: one :class:`~p11guard.testbed.Testbed` for the whole session,
  always torn down at the end.
- ``hsm_group``: the same testbed for one test; after the test every fault is cleared
  (``restore``, ``latency 0``, server started again) so tests do not leak faults.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from p11guard.testbed._testbed import Testbed


@pytest.fixture(scope="session")
def hsm_group_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    """A running testbed shared by the session; torn down at the end, whatever happened."""
    bed = Testbed(tmp_path_factory.mktemp("hsm-group"))
    try:
        bed.up()
        yield bed
    finally:
        bed.down()


@pytest.fixture
def hsm_group(hsm_group_session: Testbed) -> Iterator[Testbed]:
    """The session's testbed, with every fault cleared after the test."""
    yield hsm_group_session
    bed = hsm_group_session
    if bed.is_up:
        bed.fault("restore")
        bed.fault("latency", 0)
        bed.fault("start-server")
