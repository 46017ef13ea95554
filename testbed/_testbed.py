"""A simulated network HSM group on one machine: SoftHSM2 + p11-kit server(s) + fault proxies.

Everything lives in one directory: the SoftHSM2 config and token store, the PIN files
(mode 0600), the server and proxy logs, ``state.json`` (pids of what runs), and two
ready client configs: ``p11guard.toml`` (through the proxies: the network HSM) and
``direct.toml`` (SoftHSM2 loaded in-process: CPU-bound).

A group of N members is N ``p11-kit server`` processes over the one token store, each
behind its own fault proxy: a key made through one member is usable at once through the
others, like replicated HSMs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psutil

from p11guard.base import Config, Secret
from p11guard.testbed._configs import write_client_configs
from p11guard.testbed._devices import (
    BACKENDS,
    Device,
    device_fault,
    device_for,
    device_running,
    write_device_config,
)
from p11guard.testbed._network import check_client, start_proxy, start_server
from p11guard.testbed._opencryptoki import OpencryptokiToken
from p11guard.testbed._procs import TestbedError, alive, read_state, stop_tree, wait_for, write_state
from p11guard.testbed._proxy_control import member_status, proxy_control
from p11guard.testbed._softhsm import find_tools, init_softhsm_token
from p11guard.testbed._tpm import TpmDevice

__all__ = ["FAULTS", "MAX_MEMBERS", "Testbed", "TestbedError", "find_tools", "member_names"]

#: Fault names the testbed understands (``latency`` takes milliseconds).
FAULTS = ("lose", "restore", "hang", "latency", "kill-server", "start-server")
#: The most members a testbed runs (member names are ``hsm-a`` ... ``hsm-h``).
MAX_MEMBERS = 8


def member_names(count: int) -> list[str]:
    """The members' names: ``hsm`` for a group of one, else ``hsm-a``, ``hsm-b``, ..."""
    if not 1 <= count <= MAX_MEMBERS:
        raise TestbedError(f"members must be between 1 and {MAX_MEMBERS}, not {count}")
    return ["hsm"] if count == 1 else [f"hsm-{chr(ord('a') + i)}" for i in range(count)]


class Testbed:
    """One simulated HSM group in ``directory``.

    Args:
        directory: where everything lives; created if missing.
        token_label: the SoftHSM2 token's label.
    """

    __test__ = False

    def __init__(self, directory: str | os.PathLike[str], token_label: str = "p11guard-test") -> None:
        self.dir = Path(directory).resolve()
        self.token_label = token_label

    # -- paths --------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def config_path(self) -> Path:
        """Client config through the fault proxy (the network HSM)."""
        return self.dir / "p11guard.toml"

    @property
    def direct_config_path(self) -> Path:
        """Client config loading SoftHSM2 in-process (no network)."""
        return self.dir / "direct.toml"

    @property
    def softhsm_conf(self) -> Path:
        return self.dir / "softhsm2.conf"

    @property
    def pin_path(self) -> Path:
        return self.dir / "user.pin"

    @property
    def pin(self) -> Secret:
        return Secret(self.pin_path.read_text().strip())

    def _state(self) -> dict[str, Any]:
        return read_state(self.state_path)

    def _save(self, state: dict[str, Any]) -> None:
        write_state(self.state_path, state)

    @staticmethod
    def _members(st: dict[str, Any]) -> list[dict[str, Any]]:
        members = st.get("members")
        return [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []

    @property
    def members(self) -> list[str]:
        """The names of the running testbed's members (``[]`` when it is down)."""
        return [str(m["name"]) for m in self._members(self._state())]

    @property
    def backend(self) -> str:
        """``softhsm`` (the network group), ``opencryptoki`` or ``tpm`` (a device in-process)."""
        return str(self._state().get("backend", "softhsm"))

    def _device(self) -> Device:
        return device_for(self.backend, self.dir, self.token_label)

    @property
    def proxy_socket(self) -> str:
        """The first member's proxy socket."""
        return self.member_proxy_socket()

    def member_proxy_socket(self, member: str | None = None) -> str:
        members = self._members(self._state())
        for m in members:
            if member is None or m["name"] == member:
                return str(m["proxy_socket"])
        return ""

    @property
    def server_address(self) -> str:
        """``P11_KIT_SERVER_ADDRESS`` for a client going through the (first member's) proxy."""
        return f"unix:path={self.proxy_socket}"

    @property
    def is_up(self) -> bool:
        st = self._state()
        if st.get("backend", "softhsm") != "softhsm":
            return device_running(self._device())
        members = self._members(st)
        return bool(members) and all(alive(m.get("proxy_pid"), m.get("proxy_created")) for m in members)

    # -- life cycle ---------------------------------------------------------------------

    def up(self, timeout: float = 60.0, members: int = 1, backend: str = "softhsm") -> bool:
        """Start everything in the background; return when a client can sign through every member.

        Args:
            timeout: seconds to wait for each process.
            members: how many members (p11-kit servers, each behind its own proxy).
            backend: ``softhsm`` (a network group of SoftHSM2 behind p11-kit), ``opencryptoki``
                or ``tpm`` (one device, loaded in-process by each client; one member).

        Returns:
            ``False`` if the testbed was already running (nothing was started).

        Raises:
            TestbedError: a tool is missing, or a testbed of another shape runs here.
        """
        names = member_names(members)
        if backend not in BACKENDS:
            raise TestbedError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        if backend != "softhsm" and members != 1:
            raise TestbedError(f"the {backend} backend is one device: --members must be 1, not {members}")
        if self.is_up:
            running, running_backend = len(self.members), self.backend
            if (running, running_backend) != (members, backend):
                raise TestbedError(
                    f"a {running_backend} testbed with {running} member(s) already runs in {self.dir}; "
                    f"stop it first with: p11guard testbed down --dir {self.dir}"
                )
            return False
        if backend != "softhsm":
            return self._up_device(backend, timeout)
        tools = find_tools()
        self.down()  # a half-dead testbed from an earlier run: stop what is left of it
        self.dir.mkdir(parents=True, exist_ok=True)
        init_softhsm_token(self.dir, tools, self.token_label)
        # Unix socket paths are limited to ~107 bytes: use a short dir when ours is long.
        sockdir = self.dir / "sock"
        if len(str(sockdir)) > 80:
            sockdir = Path(tempfile.mkdtemp(prefix="p11g-", dir="/tmp"))
        sockdir.mkdir(exist_ok=True)
        state: dict[str, Any] = {
            "token_label": self.token_label,
            "sockdir": str(sockdir),
            "tools": tools,
            "members": [
                {
                    "name": name,
                    "server_socket": str(sockdir / f"{name}.server.sock"),
                    "proxy_socket": str(sockdir / f"{name}.sock"),
                    "control_socket": str(sockdir / f"{name}.control.sock"),
                }
                for name in names
            ],
        }
        self._save(state)
        try:
            save = functools.partial(self._save, state)
            for member in state["members"]:
                start_server(self.dir, tools, self.token_label, member, save, timeout)
                start_proxy(self.dir, member, save)
            for member in state["members"]:
                wait_for(functools.partial(os.path.exists, member["control_socket"]), timeout, "the fault proxy")
            write_client_configs(self.dir, tools, state, self.token_label)
            for member in state["members"]:
                check_client(tools["client"], self.token_label, self.pin, member, timeout)
        except BaseException:
            self.down()
            raise
        return True

    def _up_device(self, backend: str, timeout: float) -> bool:
        self.down()
        self.dir.mkdir(parents=True, exist_ok=True)
        device = device_for(backend, self.dir, self.token_label)
        try:
            info = device.up(timeout)
            write_device_config(self.dir, backend, info)
            self._save({"backend": backend, "token_label": self.token_label, "members": [{"name": "hsm"}]})
        except BaseException:
            device.down()
            raise
        return True

    def make_token(self) -> None:
        """Make this testbed's token (and PIN files) without starting anything."""
        init_softhsm_token(self.dir, find_tools(), self.token_label)

    def client_config(self, direct: bool = False, **changes: Any) -> Config:
        """A validated client config for tests and tools: short timeouts, fault injection on.

        Args:
            direct: SoftHSM2 in-process instead of through the fault proxy.
            changes: any :class:`~p11guard.Config` field to override.
        """
        path = self.direct_config_path if direct else self.config_path
        defaults: dict[str, Any] = {
            "workers": 2,
            "call_s": 3.0,
            "probe_s": 1.0,
            "probe_interval_s": 0.5,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "op_deadline_s": 60.0,
            "fault_injection": True,
        }
        return Config.from_file(path).replace(**{**defaults, **changes})

    def ensure_keys(self, keys: dict[str, str]) -> None:
        """Create each ``label: type`` that is missing (key pairs and secrets alike)."""
        from p11guard.host import HostProcess
        from p11guard.protocol import SECRET_TYPES

        config = Config.from_file(self.direct_config_path)
        host = HostProcess.spawn(config.module_path, env=config.module_env)
        try:
            host.open(self.token_label, self.pin, 30)
            have = {k["label"] for k in host.call("list_keys")}
            for label, ktype in keys.items():
                if label not in have:
                    op = "generate_secret" if ktype in SECRET_TYPES else "generate_key_pair"
                    host.call(op, {"label": label, "type": ktype}, 120)
        finally:
            host.close()

    def down(self) -> None:
        """Stop every process the testbed started, by pid. The token and its keys stay."""
        st = self._state()
        if not st:
            return
        if st.get("backend", "softhsm") != "softhsm":
            self._device().down()
            with contextlib.suppress(FileNotFoundError):
                self.state_path.unlink()
            return
        for member in self._members(st):
            stop_tree(member.get("proxy_pid"), member.get("proxy_created"))
            stop_tree(member.get("server_pid"), member.get("server_created"))
        sockdir = st.get("sockdir")
        if sockdir and Path(sockdir) != self.dir / "sock":
            shutil.rmtree(sockdir, ignore_errors=True)
        else:
            for member in self._members(st):
                for key in ("server_socket", "proxy_socket", "control_socket"):
                    with contextlib.suppress(OSError, TypeError, KeyError):
                        os.unlink(member[key])
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    def pids(self) -> list[int]:
        """Pids of every live process of this testbed (server trees and proxies; daemons)."""
        if self.backend == "tpm":
            return [p for p in TpmDevice(self.dir, self.token_label).status()["pids"].values() if p]
        if self.backend == "opencryptoki":
            return OpencryptokiToken(self.dir, self.token_label).pids()
        out: list[int] = []
        for member in self._members(self._state()):
            for key in ("server", "proxy"):
                pid, created = member.get(f"{key}_pid"), member.get(f"{key}_created")
                if alive(pid, created):
                    assert pid is not None
                    with contextlib.suppress(psutil.Error):
                        out += [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
        return out

    # -- faults -------------------------------------------------------------------------

    def _require_up(self) -> dict[str, Any]:
        st = self._state()
        if st.get("backend", "softhsm") != "softhsm" and self.is_up:
            return st
        if not self._members(st) or not any(
            alive(m.get("proxy_pid"), m.get("proxy_created")) for m in self._members(st)
        ):
            raise TestbedError(
                f"no testbed is running in {self.dir}; start one with: p11guard testbed up --dir {self.dir}"
            )
        return st

    def fault(self, name: str, ms: float | None = None, member: str | None = None) -> dict[str, Any]:
        """Inject a fault: ``lose``, ``restore``, ``hang``, ``latency`` (ms), ``kill-server``,
        ``start-server``; on one ``member``, or on every member at once (the whole group).

        Returns:
            The new status.
        """
        st = self._require_up()
        if st.get("backend", "softhsm") != "softhsm":
            device_fault(self._device(), name)
            return self.status(member)
        if name not in FAULTS:
            raise TestbedError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
        if name == "latency" and (ms is None or ms < 0):
            raise TestbedError("latency needs a number of milliseconds >= 0, e.g. `latency 2`")
        targets = self._members(st)
        if member is not None:
            targets = [m for m in targets if m["name"] == member]
            if not targets:
                known = ", ".join(m["name"] for m in self._members(st))
                raise TestbedError(f"no member {member!r} in this testbed; its members: {known}")
        for target in targets:
            if name == "kill-server":
                stop_tree(target.get("server_pid"), target.get("server_created"))
                target["server_pid"] = target["server_created"] = None
                self._save(st)
            elif name == "start-server":
                if not alive(target.get("server_pid"), target.get("server_created")):
                    start_server(self.dir, st["tools"], self.token_label, target, functools.partial(self._save, st), 30)
            else:
                proxy_control(target["control_socket"], {"cmd": name, "ms": ms})
        return self.status(member)

    def status(self, member: str | None = None) -> dict[str, Any]:
        """Which processes run and which fault is active, per member.

        The top-level ``server``, ``proxy`` and ``fault`` are those of ``member`` (default:
        the first member); ``members`` lists every member.
        """
        st = self._state()
        members = self._members(st)
        if not members:
            return {"up": False, "dir": str(self.dir)}
        backend = st.get("backend", "softhsm")
        if backend != "softhsm":
            device = self._device()
            detail = device.status() if isinstance(device, TpmDevice) else {"pids": {"pkcsslotd": device.pids()}}
            return {
                "up": self.is_up,
                "dir": str(self.dir),
                "config": str(self.config_path),
                "backend": backend,
                "fault": {"device": detail.get("device", "running")},
                **detail,
            }
        listed = [member_status(m) for m in members]
        first = next((m for m in listed if m["name"] == member), listed[0])
        out: dict[str, Any] = {
            "up": all(m["proxy"]["running"] for m in listed),
            "dir": str(self.dir),
            "config": str(self.config_path),
            **{k: v for k, v in first.items() if k in ("server", "proxy", "fault")},
            "members": listed,
        }
        return out
