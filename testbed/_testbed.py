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
import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from p11guard.base import Config, P11GuardError, Secret

__all__ = ["FAULTS", "MAX_MEMBERS", "Testbed", "TestbedError", "find_tools", "member_names"]

#: Fault names the testbed understands (``latency`` takes milliseconds).
FAULTS = ("lose", "restore", "hang", "latency", "kill-server", "start-server")
#: The most members a testbed runs (member names are ``hsm-a`` ... ``hsm-h``).
MAX_MEMBERS = 8
_INSTALL_HINT = "install them with: apt-get update && apt-get install -y softhsm2 p11-kit p11-kit-modules"


class TestbedError(P11GuardError):
    """The testbed cannot do what was asked; the message says what to do."""

    __test__ = False  # not a pytest test class


def find_tools() -> dict[str, str]:
    """Locate SoftHSM2, ``p11-kit`` and ``p11-kit-client.so``.

    Raises:
        TestbedError: something is missing (names the Debian packages to install).
    """

    def first(env: str, candidates: list[str]) -> str | None:
        if env in os.environ:  # an explicit choice (also how tests simulate a missing tool)
            return os.environ[env] if os.path.exists(os.environ[env]) else None
        return next(iter(candidates), None)

    softhsm = first(
        "P11GUARD_SOFTHSM2_MODULE",
        glob.glob("/usr/lib/softhsm/libsofthsm2.so") + glob.glob("/usr/lib/*/softhsm/libsofthsm2.so"),
    )
    p11kit = first("P11GUARD_P11KIT", [p for p in [shutil.which("p11-kit")] if p])
    client = first(
        "P11GUARD_P11KIT_CLIENT",
        glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so") + glob.glob("/usr/lib/pkcs11/p11-kit-client.so"),
    )
    missing = [
        name for name, path in (("softhsm2", softhsm), ("p11-kit", p11kit), ("p11-kit-modules", client)) if not path
    ]
    if missing:
        raise TestbedError(f"missing Debian packages: {', '.join(missing)}; {_INSTALL_HINT}")
    assert softhsm and p11kit and client
    return {"softhsm": softhsm, "p11kit": p11kit, "client": client}


_INIT_TOKEN = r"""
import json, sys, PyKCS11
d = json.loads(sys.stdin.read())
lib = PyKCS11.PyKCS11Lib(); lib.load(d["module"])
free = [s for s in lib.getSlotList() if not lib.getTokenInfo(s).flags & PyKCS11.CKF_TOKEN_INITIALIZED]
lib.initToken(free[0], d["so"], d["label"].ljust(32))
slot = [s for s in lib.getSlotList() if lib.getTokenInfo(s).label.rstrip(" \x00") == d["label"]][0]
s = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
s.login(d["so"], PyKCS11.CKU_SO); s.initPin(d["user"]); s.logout(); s.closeSession()
"""


def member_names(count: int) -> list[str]:
    """The members' names: ``hsm`` for a group of one, else ``hsm-a``, ``hsm-b``, ..."""
    if not 1 <= count <= MAX_MEMBERS:
        raise TestbedError(f"members must be between 1 and {MAX_MEMBERS}, not {count}")
    return ["hsm"] if count == 1 else [f"hsm-{chr(ord('a') + i)}" for i in range(count)]


def _alive(pid: int | None, created: float | None) -> bool:
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (created is None or abs(proc.create_time() - created) < 0.01)
    except psutil.Error:
        return False


def _stop_tree(pid: int | None, created: float | None, timeout: float = 5.0) -> None:
    """Stop a process and all its descendants, by pid (never by name)."""
    if not _alive(pid, created):
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


def _wait_for(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    delay = 0.005
    while not cond():
        if time.monotonic() > end:
            raise TestbedError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)  # polling a condition with a deadline, not a fixed wait
        delay = min(delay * 2, 0.1)


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
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    @staticmethod
    def _members(st: dict[str, Any]) -> list[dict[str, Any]]:
        members = st.get("members")
        return [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []

    @property
    def members(self) -> list[str]:
        """The names of the running testbed's members (``[]`` when it is down)."""
        return [str(m["name"]) for m in self._members(self._state())]

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
        members = self._members(self._state())
        return bool(members) and all(_alive(m.get("proxy_pid"), m.get("proxy_created")) for m in members)

    # -- life cycle ---------------------------------------------------------------------

    def up(self, timeout: float = 60.0, members: int = 1) -> bool:
        """Start everything in the background; return when a client can sign through every member.

        Args:
            timeout: seconds to wait for each process.
            members: how many members (p11-kit servers, each behind its own proxy).

        Returns:
            ``False`` if the testbed was already running (nothing was started).

        Raises:
            TestbedError: a tool is missing, or a testbed with another member count runs here.
        """
        names = member_names(members)
        if self.is_up:
            running = len(self.members)
            if running != members:
                raise TestbedError(
                    f"a testbed with {running} member(s) already runs in {self.dir}; "
                    f"stop it first with: p11guard testbed down --dir {self.dir}"
                )
            return False
        tools = find_tools()
        self.down()  # a half-dead testbed from an earlier run: stop what is left of it
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ensure_token(tools)
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
            for member in state["members"]:
                self._start_server(state, member, timeout)
                self._start_proxy(state, member)
            for member in state["members"]:
                _wait_for(lambda m=member: os.path.exists(m["control_socket"]), timeout, "the fault proxy")
            self._write_configs(tools, state)
            for member in state["members"]:
                self._check_client(member, timeout)
        except BaseException:
            self.down()
            raise
        return True

    def _log(self, what: str, member: dict[str, Any]) -> Path:
        return self.dir / (f"{what}.log" if member["name"] == "hsm" else f"{what}-{member['name']}.log")

    def _start_proxy(self, state: dict[str, Any], member: dict[str, Any]) -> None:
        log = open(self._log("proxy", member), "ab")  # noqa: SIM115 - handed to the child
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
        self._save(state)

    def _ensure_token(self, tools: dict[str, str]) -> None:
        tokens = self.dir / "tokens"
        ready = self.dir / "token.ready"
        if ready.exists():
            return
        shutil.rmtree(tokens, ignore_errors=True)  # a half-made token from an interrupted run
        tokens.mkdir(parents=True, exist_ok=True)
        self.softhsm_conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        )
        user, so = secrets.token_hex(8), secrets.token_hex(8)
        for path, value in ((self.pin_path, user), (self.dir / "so.pin", so)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(value + "\n")
        # PINs go through stdin: never on a command line.
        done = subprocess.run(
            [sys.executable, "-c", _INIT_TOKEN],
            input=json.dumps({"module": tools["softhsm"], "label": self.token_label, "so": so, "user": user}),
            env={**os.environ, "SOFTHSM2_CONF": str(self.softhsm_conf)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise TestbedError(f"cannot initialise the SoftHSM2 token: {tail[0]}")
        ready.write_text(self.token_label + "\n")

    def _start_server(self, state: dict[str, Any], member: dict[str, Any], timeout: float) -> None:
        tools = state["tools"]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(member["server_socket"])
        log_path = self._log("server", member)
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
                    f"pkcs11:token={self.token_label}",
                ],
                env={**os.environ, "SOFTHSM2_CONF": str(self.softhsm_conf)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        member["server_pid"] = proc.pid
        member["server_created"] = psutil.Process(proc.pid).create_time()
        self._save(state)

        def ready() -> bool:
            if proc.poll() is not None:
                raise TestbedError(f"p11-kit server exited with {proc.returncode}; see {log_path}")
            return os.path.exists(member["server_socket"])

        _wait_for(ready, timeout, f"p11-kit server of {member['name']}")

    def _write_configs(self, tools: dict[str, str], state: dict[str, Any]) -> None:
        common = (
            f'[group]\ntoken_label = "{self.token_label}"\npin_file = "{self.pin_path}"\n\n'
            "[timeouts]\nprobe_interval_s = 1.0\n\n"
            "[recovery]\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.5\n\n"
            "[testing]\nfault_injection = true\n"
        )
        members = state["members"]
        if len(members) == 1:
            network = (
                "# Written by `p11guard testbed up`: the simulated network HSM group.\n"
                f'[module]\npath = "{tools["client"]}"\n'
                f'env = {{ P11_KIT_SERVER_ADDRESS = "unix:path={members[0]["proxy_socket"]}" }}\n\n' + common
            )
        else:
            network = (
                f"# Written by `p11guard testbed up --members {len(members)}`: the simulated network HSM group.\n"
                f'[module]\npath = "{tools["client"]}"\n\n'
                + common
                + "".join(
                    f'\n[[group.members]]\nname = "{m["name"]}"\n'
                    f'env = {{ P11_KIT_SERVER_ADDRESS = "unix:path={m["proxy_socket"]}" }}\n'
                    for m in members
                )
            )
        self.config_path.write_text(network)
        self.direct_config_path.write_text(
            "# Written by `p11guard testbed up`: SoftHSM2 loaded in-process, no network.\n"
            f'[module]\npath = "{tools["softhsm"]}"\n'
            f'env = {{ SOFTHSM2_CONF = "{self.softhsm_conf}" }}\n\n' + common
        )

    def _check_client(self, member: dict[str, Any], timeout: float) -> None:
        from p11guard.host import HostProcess

        state = self._state()
        host = HostProcess.spawn(
            state["tools"]["client"],
            env={"P11_KIT_SERVER_ADDRESS": f"unix:path={member['proxy_socket']}"},
            start_timeout_s=timeout,
        )
        try:
            host.open(self.token_label, self.pin, timeout)
            host.call("random", {"n": 16}, timeout)
        finally:
            host.close()

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
        for member in self._members(st):
            _stop_tree(member.get("proxy_pid"), member.get("proxy_created"))
            _stop_tree(member.get("server_pid"), member.get("server_created"))
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
        """Pids of every live process of this testbed (server trees and proxies)."""
        out: list[int] = []
        for member in self._members(self._state()):
            for key in ("server", "proxy"):
                pid, created = member.get(f"{key}_pid"), member.get(f"{key}_created")
                if _alive(pid, created):
                    assert pid is not None
                    with contextlib.suppress(psutil.Error):
                        out += [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
        return out

    # -- faults -------------------------------------------------------------------------

    def _require_up(self) -> dict[str, Any]:
        st = self._state()
        if not self._members(st) or not any(
            _alive(m.get("proxy_pid"), m.get("proxy_created")) for m in self._members(st)
        ):
            raise TestbedError(
                f"no testbed is running in {self.dir}; start one with: p11guard testbed up --dir {self.dir}"
            )
        return st

    def _control(self, member: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(member["control_socket"])
            sock.sendall(json.dumps(msg).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply: dict[str, Any] = json.loads(data)
        if not reply.get("ok"):
            raise TestbedError(str(reply.get("error")))
        return reply

    def fault(self, name: str, ms: float | None = None, member: str | None = None) -> dict[str, Any]:
        """Inject a fault: ``lose``, ``restore``, ``hang``, ``latency`` (ms), ``kill-server``,
        ``start-server``; on one ``member``, or on every member at once (the whole group).

        Returns:
            The new status.
        """
        if name not in FAULTS:
            raise TestbedError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
        st = self._require_up()
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
                _stop_tree(target.get("server_pid"), target.get("server_created"))
                target["server_pid"] = target["server_created"] = None
                self._save(st)
            elif name == "start-server":
                if not _alive(target.get("server_pid"), target.get("server_created")):
                    self._start_server(st, target, 30.0)
            else:
                self._control(target, {"cmd": name, "ms": ms})
        return self.status(member)

    def _member_status(self, member: dict[str, Any]) -> dict[str, Any]:
        proxy_up = _alive(member.get("proxy_pid"), member.get("proxy_created"))
        server_up = _alive(member.get("server_pid"), member.get("server_created"))
        out: dict[str, Any] = {
            "name": member["name"],
            "address": f"unix:path={member['proxy_socket']}",
            "server": {"pid": member.get("server_pid") if server_up else None, "running": server_up},
            "proxy": {"pid": member.get("proxy_pid") if proxy_up else None, "running": proxy_up},
        }
        if proxy_up:
            with contextlib.suppress(OSError, ValueError, TestbedError):
                out["fault"] = {k: v for k, v in self._control(member, {"cmd": "status"}).items() if k != "ok"}
        return out

    def status(self, member: str | None = None) -> dict[str, Any]:
        """Which processes run and which fault is active, per member.

        The top-level ``server``, ``proxy`` and ``fault`` are those of ``member`` (default:
        the first member); ``members`` lists every member.
        """
        st = self._state()
        members = self._members(st)
        if not members:
            return {"up": False, "dir": str(self.dir)}
        listed = [self._member_status(m) for m in members]
        first = next((m for m in listed if m["name"] == member), listed[0])
        out: dict[str, Any] = {
            "up": all(m["proxy"]["running"] for m in listed),
            "dir": str(self.dir),
            "config": str(self.config_path),
            **{k: v for k, v in first.items() if k in ("server", "proxy", "fault")},
            "members": listed,
        }
        return out
