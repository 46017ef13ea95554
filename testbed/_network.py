"""The network group: one ``p11-kit server`` per member over the SoftHSM2 token store, each
behind a fault proxy of ours; a client reaches a member through its proxy's socket."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from p11guard.base import Secret
from p11guard.testbed._procs import TestbedError, wait_for

__all__ = ["check_client", "start_proxy", "start_server"]


def _log(directory: Path, what: str, member: dict[str, Any]) -> Path:
    return directory / (f"{what}.log" if member["name"] == "hsm" else f"{what}-{member['name']}.log")


def start_proxy(directory: Path, member: dict[str, Any], save: Callable[[], None]) -> None:
    """Start the member's fault proxy (``python -m p11guard.testbed._proxy``), in its own session."""
    log = open(_log(directory, "proxy", member), "ab")  # noqa: SIM115 - handed to the child
    with log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "p11guard.testbed._proxy",
                "--listen",
                member["proxy_socket"],
                "--upstream",
                member["server_socket"],
                "--control",
                member["control_socket"],
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    member["proxy_pid"] = proc.pid
    member["proxy_created"] = psutil.Process(proc.pid).create_time()
    save()


def start_server(
    directory: Path,
    tools: dict[str, str],
    token_label: str,
    member: dict[str, Any],
    save: Callable[[], None],
    timeout: float,
) -> None:
    """Start the member's ``p11-kit server`` for SoftHSM2; return when its socket is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(member["server_socket"])
    log_path = _log(directory, "server", member)
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    with log:
        proc = subprocess.Popen(
            [
                tools["p11kit"],
                "server",
                "-f",
                "--provider",
                tools["softhsm"],
                "-n",
                member["server_socket"],
                f"pkcs11:token={token_label}",
            ],
            env={**os.environ, "SOFTHSM2_CONF": str(directory / "softhsm2.conf")},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    member["server_pid"] = proc.pid
    member["server_created"] = psutil.Process(proc.pid).create_time()
    save()

    def ready() -> bool:
        if proc.poll() is not None:
            raise TestbedError(f"p11-kit server exited with {proc.returncode}; see {log_path}")
        return os.path.exists(member["server_socket"])

    wait_for(ready, timeout, f"p11-kit server of {member['name']}")


def check_client(client: str, token_label: str, pin: Secret, member: dict[str, Any], timeout: float) -> None:
    """A real client logs in and draws random bytes through the member's proxy."""
    from p11guard.host import HostProcess

    host = HostProcess.spawn(
        client, env={"P11_KIT_SERVER_ADDRESS": f"unix:path={member['proxy_socket']}"}, start_timeout_s=timeout
    )
    try:
        host.open(token_label, pin, timeout)
        host.call("random", {"n": 16}, timeout)
    finally:
        host.close()
