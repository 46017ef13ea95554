"""Shared fixtures: a session testbed (from the p11guard pytest plugin), keys, helpers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from p11guard import Config
from p11guard.host import HostProcess
from p11guard.testbed import Testbed

EC_KEY = "test-ec"
KEYS = {"test-ec": "ec-p256", "test-ec384": "ec-p384", "test-rsa": "rsa-2048", "test-ed": "ed25519"}
SECRETS = {"test-aes": "aes-256", "test-hmac": "hmac-sha256"}


def wait_until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until it is true or ``timeout`` passes (no fixed sleeps in tests)."""
    end = time.monotonic() + timeout
    delay = 0.005
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="session")
def bed(hsm_group_session: Testbed) -> Testbed:
    """The session testbed, with the test keys created once."""
    hsm_group_session.ensure_keys({**KEYS, **SECRETS})
    return hsm_group_session


@pytest.fixture
def group(bed: Testbed, hsm_group: Testbed) -> Iterator[Testbed]:
    """The testbed for one test; faults are cleared afterwards (by ``hsm_group``)."""
    yield bed


@pytest.fixture
def net_config(group: Testbed) -> Config:
    """Config through the fault proxy, with short timeouts for tests."""
    return group.client_config(backoff_max_s=0.3, op_deadline_s=30.0)


@pytest.fixture
def direct_config(bed: Testbed) -> Config:
    return Config.from_file(bed.direct_config_path).replace(workers=2)


def spawn_host(config: Config, generation: int = 0, fault_injection: bool = True) -> HostProcess:
    return HostProcess.spawn(
        config.module_path, env=config.module_env, generation=generation, fault_injection=fault_injection
    )


def _opened(config: Config, bed: Testbed) -> Iterator[HostProcess]:
    host = spawn_host(config)
    try:
        host.open(bed.token_label, bed.pin, 10)
        yield host
    finally:
        host.kill()


@pytest.fixture
def open_host(direct_config: Config, bed: Testbed) -> Iterator[HostProcess]:
    """A host on SoftHSM2 directly, logged in."""
    yield from _opened(direct_config, bed)


@pytest.fixture
def net_host(net_config: Config, group: Testbed) -> Iterator[HostProcess]:
    """A host through the testbed's fault proxy, logged in."""
    yield from _opened(net_config, group)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
