"""Shared fixtures: a session testbed (from the p11guard pytest plugin), keys, helpers."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from p11guard import Config, Guard
from p11guard.base import poll_until
from p11guard.host import HostProcess
from p11guard.testbed import Testbed

EC_KEY = "test-ec"
KEYS = {"test-ec": "ec-p256", "test-ec384": "ec-p384", "test-rsa": "rsa-2048", "test-ed": "ed25519"}
SECRETS = {"test-aes": "aes-256", "test-hmac": "hmac-sha256"}


def wait_until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until it is true or ``timeout`` passes (no fixed sleeps in tests)."""
    poll_until(cond, timeout, what, AssertionError, max_delay=0.05)


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


class Load:
    """Client threads signing until stopped; keeps every (data, signature) and error."""

    def __init__(self, guard: Guard, threads: int = 8) -> None:
        self.guard = guard
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.signed: list[tuple[bytes, bytes]] = []
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, tid: int) -> None:
        n = 0
        while not self.stop.is_set():
            data = b"t%d-%d" % (tid, n)
            n += 1
            try:
                sig = self.guard.sign(EC_KEY, data)
            except Exception as exc:
                with self.lock:
                    self.errors.append(exc)
            else:
                with self.lock:
                    self.signed.append((data, sig))

    def count(self) -> int:
        with self.lock:
            return len(self.signed)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        wait_until(lambda: self.count() >= 20, 20, "load to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client thread is stuck"

    def verify_all(self, pem: bytes) -> None:
        pub = load_pem_public_key(pem)
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        for data, sig in self.signed:
            pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))


@contextmanager
def guard(config: Config) -> Iterator[Guard]:
    g = Guard(config)
    # every worker up (a spurious start-up error makes one come up a little later)
    wait_until(lambda: all(w["status"] == "idle" for w in g.status()["workers"]), 10, "all workers up")
    pids = list(g.host_pids().values())
    try:
        yield g
    finally:
        g.close()
        pids += list(g.host_pids().values())
        assert not g.host_pids(), "hosts left after close()"
        for pid in pids:
            wait_until(lambda pid=pid: gone(pid), 5, f"host {pid} to be gone")


def state_in(g: Guard, *states: str) -> bool:
    return g.state in states


def progress_after(load: Load, extra: int = 50) -> None:
    target = load.count() + extra
    wait_until(lambda: load.count() >= target, 30, f"{extra} more signatures")


NOT_SERVING = ("SUSPECT", "LOST", "RECOVERING")
