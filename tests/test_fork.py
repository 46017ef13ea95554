"""Fork safety: a guard used in a child of ``os.fork()`` fails at once, never hangs, and the
child never touches the parent's hosts; a guard created in the child after the fork works."""

from __future__ import annotations

import atexit
import gc
import json
import os
import select
import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest

from conftest import EC_KEY, guard
from p11guard import Config, Guard, GuardForked
from p11guard.testbed import Testbed


@contextmanager
def _quiet_fork() -> Iterator[None]:
    with warnings.catch_warnings():  # 3.12+: "this process is multi-threaded, fork() may deadlock"
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def in_child(body: Callable[[], dict[str, Any]], timeout: float = 60.0) -> dict[str, Any]:
    """Run ``body`` in a forked child; its dict comes back as JSON. A child that does not
    finish within ``timeout`` is killed and the test fails (a hang is the bug)."""
    read, write = os.pipe()
    with _quiet_fork():
        pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanups
        os.close(read)
        code = 0
        try:
            out = body()
        except BaseException as exc:
            out, code = {"crash": f"{type(exc).__name__}: {exc}"}, 1
        os.write(write, json.dumps(out).encode())
        os._exit(code)
    os.close(write)
    pidfd = os.pidfd_open(pid)
    try:  # readable when the child exits: wait on it, with the deadline
        exited = select.select([pidfd], [], [], timeout)[0]
    finally:
        os.close(pidfd)
    if not exited:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"the forked child hung for {timeout:g} s")
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as fh:
        result: dict[str, Any] = json.loads(fh.read() or b"{}")
    assert "crash" not in result, result["crash"]
    assert os.waitstatus_to_exitcode(status) == 0
    return result


def _host_processes(g: Guard) -> dict[str, psutil.Process]:
    return {name: psutil.Process(pid) for name, pid in g.host_pids().items()}


def test_a_guard_used_after_fork_fails_at_once_and_the_parent_keeps_signing(net_config: Config) -> None:
    with guard(net_config) as g:
        pub = g.public_key(EC_KEY)
        hosts = _host_processes(g)

        def child() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, call in {
                "sign": lambda: g.sign(EC_KEY, b"from the child"),
                "submit_sign": lambda: g.submit_sign(EC_KEY, b"x"),
                "sign_many": lambda: g.sign_many(EC_KEY, [b"a", b"b"]),
                "status": g.status,
                "health": g.health,
                "host_pids": g.host_pids,
            }.items():
                try:
                    call()
                    out[name] = "no error"
                except GuardForked as exc:
                    out[name] = str(exc)
            g.close()  # only this copy: the hosts are the parent's
            out["closed_in_child"] = True
            return out

        result = in_child(child)
        for name in ("sign", "submit_sign", "sign_many", "status", "health", "host_pids"):
            assert "before os.fork()" in result[name], (name, result[name])
        message = result["sign"]
        assert str(os.getpid()) in message
        assert "post_fork" in message and "worker_process_init" in message

        # The parent is unharmed: the same hosts, alive, and it keeps signing.
        assert _host_processes(g) == hosts
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in hosts.values())
        data = [b"after the child %d" % i for i in range(50)]
        signatures = g.sign_many(EC_KEY, data)
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(pub)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        for d, s in zip(data, signatures, strict=True):
            key.verify(s, d, ec.ECDSA(hashes.SHA256()))
        assert g.state == "SERVING" and g.status()["generation"] == 0


def test_a_child_that_exits_normally_leaves_the_parents_hosts_alone(net_config: Config) -> None:
    # A child that never touched the guard and goes through an interpreter's exit work:
    # its copy of the guard collected, the atexit handlers run. (Not sys.exit(): in a
    # forked pytest that would run the session's teardown in the child.)
    with guard(net_config) as g:
        hosts = _host_processes(g)

        def child() -> dict[str, Any]:
            nonlocal g
            del g
            gc.collect()
            atexit._run_exitfuncs()
            return {}

        in_child(child)
        assert _host_processes(g) == hosts
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in hosts.values())
        assert g.sign(EC_KEY, b"still here")


def test_a_guard_created_after_the_fork_works_in_the_child(net_config: Config, group: Testbed) -> None:
    # The documented fix: create the guard in the child (gunicorn post_fork, Celery
    # worker_process_init). The parent had a guard of its own at the fork.
    with guard(net_config) as g:

        def child() -> dict[str, Any]:
            with Guard(net_config.replace(workers=1)) as mine:
                signature = mine.sign(EC_KEY, b"signed in the child")
                return {"ok": mine.verify(EC_KEY, b"signed in the child", signature), "pids": mine.host_pids()}

        result = in_child(child)
        assert result["ok"] is True
        assert not set(result["pids"].values()) & set(g.host_pids().values())
        assert g.sign(EC_KEY, b"parent")
