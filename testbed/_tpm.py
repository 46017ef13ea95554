"""A software TPM as a PKCS#11 device that can really be lost: swtpm + tpm2-abrmd + tpm2-pkcs11.

Everything lives in one directory: the swtpm state, the tpm2-pkcs11 store (``tpm2-store``),
the PIN files (mode 0600), the daemon logs and ``tpm-state.json`` (pids, create times,
ports, D-Bus address), so that any process can stop, kill, hang or restart the device.

A private session ``dbus-daemon`` carries the resource manager (tpm2-abrmd); swtpm listens
on a loopback TCP port pair (P for commands, P+1 for control). Killing swtpm is a device
loss: calls of a loaded module that reach the TPM answer ``CKR_GENERAL_ERROR`` from then on,
even once swtpm is back, until ``C_Finalize`` + ``C_Initialize``; a stopped (SIGSTOP) swtpm
makes them block until it is resumed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from p11guard.testbed._procs import TestbedError, read_state, write_state

__all__ = ["TpmDevice", "TpmSetupError", "find_tpm_tools"]

_PACKAGES = "swtpm tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus-daemon"
_TCTI = "tabrmd:bus_type=session"
_ABRMD_NAME = "com.intel.tss2.Tabrmd"
# Runs tpm2_ptool's entry point in a child: the PINs come on stdin, never on a command line.
_PTOOL = (
    "import json, sys\n"
    "req = json.load(sys.stdin)\n"
    "sys.argv = ['tpm2_ptool'] + req['argv'] + ['--%s=%s' % kv for kv in req['pins'].items()]\n"
    "from tpm2_pkcs11.tpm2_ptool import main\n"
    "main()\n"
)
_LAUNCH = (
    "import json, subprocess, sys\n"
    "req = json.load(sys.stdin)\n"
    "p = subprocess.Popen(req['argv'], stdin=subprocess.DEVNULL, stdout=open(req['log'], 'ab'),\n"
    "                     stderr=subprocess.STDOUT, start_new_session=True)\n"
    "print(p.pid)\n"
)


class TpmSetupError(TestbedError):
    """The software TPM cannot be set up or driven; the message says why and what to install."""


def find_tpm_tools() -> dict[str, str]:
    """Locate swtpm, tpm2-abrmd, dbus, tpm2_ptool (and its Python) and the PKCS#11 module.

    Raises:
        TpmSetupError: something is missing (names the Debian packages to install).
    """
    libs = "/usr/lib/*/"
    found: dict[str, tuple[str | None, str]] = {
        "swtpm": (shutil.which("swtpm"), "swtpm"),
        "abrmd": (shutil.which("tpm2-abrmd") or shutil.which("tpm2-abrmd", path="/usr/sbin:/sbin"), "tpm2-abrmd"),
        "dbus_daemon": (shutil.which("dbus-daemon"), "dbus-daemon"),
        "dbus_send": (shutil.which("dbus-send"), "dbus-bin"),
        "ptool": (shutil.which("tpm2_ptool"), "libtpm2-pkcs11-tools"),
        "tpm2_tools": (shutil.which("tpm2_createprimary"), "tpm2-tools"),
        "module": (
            os.environ.get("P11GUARD_TPM2_PKCS11_MODULE")
            or next(iter(glob.glob(libs + "pkcs11/libtpm2_pkcs11.so") + glob.glob(libs + "libtpm2_pkcs11.so*")), None),
            "libtpm2-pkcs11-1",
        ),
        "tcti_tabrmd": (next(iter(glob.glob(libs + "libtss2-tcti-tabrmd.so*")), None), "libtss2-tcti-tabrmd0"),
        "tcti_swtpm": (next(iter(glob.glob(libs + "libtss2-tcti-swtpm.so*")), None), "libtss2-tcti-swtpm0"),
    }
    ptool = found["ptool"][0]
    if ptool:  # tpm2_ptool's own interpreter (it imports tpm2_pkcs11 from dist-packages)
        with open(ptool, "rb") as f:
            first = f.readline().decode(errors="replace")
        found["ptool_python"] = (first[2:].strip().split()[0] if first.startswith("#!") else None, "python3")
    missing = sorted({pkg for path, pkg in found.values() if not path or not os.path.exists(path)})
    if missing:
        raise TpmSetupError(
            f"missing Debian packages: {', '.join(missing)}; "
            f"install them with: apt-get update && apt-get install -y {_PACKAGES}"
        )
    return {name: path for name, (path, _) in found.items() if path}


def _wait(what: str, cond: Callable[[], bool], deadline: float, log: Path | None = None) -> None:
    """Poll ``cond`` until it holds; raise TpmSetupError (with the log's tail) at the deadline."""
    delay = 0.01
    while not cond():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise TpmSetupError(f"{what} not ready in time" + (f"; log:\n{tail}" if tail else ""))
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _free_port_pair() -> int:
    """A loopback port P such that P and P+1 are both free now (TIME_WAIT leftovers count as
    free: swtpm binds with SO_REUSEADDR too)."""
    for _ in range(200):
        with socket.socket() as a, socket.socket() as b:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            with contextlib.suppress(OSError, OverflowError):
                b.bind(("127.0.0.1", port + 1))
                return port
    raise TpmSetupError("no free loopback port pair")


def _proc(entry: dict[str, Any] | None) -> psutil.Process | None:
    """The live (non-zombie) process recorded as {pid, create_time}, or None."""
    if not entry:
        return None
    try:
        p = psutil.Process(entry["pid"])
        if abs(p.create_time() - entry["create_time"]) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


def _gone(entries: list[dict[str, Any]], timeout: float) -> bool:
    """Wait until none of ``entries`` runs (a zombie counts as gone); True if all went in time."""
    with contextlib.suppress(TpmSetupError):
        _wait("exit", lambda: not any(_proc(e) for e in entries), time.monotonic() + timeout)
    return not any(_proc(e) for e in entries)


def _listening(pid: int, ports: tuple[int, ...]) -> bool:
    """True when process ``pid`` listens on every one of ``ports``."""
    try:
        p = psutil.Process(pid)
        conns = p.net_connections(kind="tcp") if hasattr(p, "net_connections") else p.connections(kind="tcp")
    except psutil.Error:
        return False
    return set(ports) <= {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}


class TpmDevice:
    """A software TPM token in ``directory``; every method also works from another process."""

    def __init__(self, directory: Path, label: str = "p11guard-test") -> None:
        self.directory = Path(directory).resolve()
        self.label = label
        self.state_file = self.directory / "tpm-state.json"
        self.store = self.directory / "tpm2-store"
        self.pin_file = self.directory / "user.pin"
        self.so_pin_file = self.directory / "so.pin"

    # -- state ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return read_state(self.state_file)

    def _save(self, state: dict[str, Any]) -> None:
        write_state(self.state_file, state)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
        """Start a daemon (output to ``<name>.log``) through a launcher, so it is not our child
        and leaves no zombie here whoever stops it; return its {pid, create_time}."""
        log = str(self.directory / f"{name}.log")
        out = subprocess.run([sys.executable, "-c", _LAUNCH], input=json.dumps({"argv": argv, "log": log}),
                             capture_output=True, text=True, env=env, check=True, timeout=30)  # fmt: skip
        pid = int(out.stdout)
        try:
            return {"pid": pid, "create_time": psutil.Process(pid).create_time()}
        except psutil.Error:  # it died at once (e.g. its port was taken)
            return {"pid": pid, "create_time": 0.0}

    def env(self, state: dict[str, Any] | None = None) -> dict[str, str]:
        """The environment a PKCS#11 client of the module needs."""
        state = state if state is not None else self._state()
        return {"TPM2_PKCS11_STORE": str(self.store), "TPM2_PKCS11_TCTI": _TCTI,
                "DBUS_SESSION_BUS_ADDRESS": str(state.get("dbus_address", ""))}  # fmt: skip

    def _info(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"module": state["module"], "env": self.env(state), "token_label": self.label,
                "pin_file": str(self.pin_file), "so_pin_file": str(self.so_pin_file)}  # fmt: skip

    # -- life cycle ----------------------------------------------------------------------
    def up(self, timeout: float = 60.0) -> dict[str, Any]:
        """Start dbus, swtpm and tpm2-abrmd, make (or reuse) the token; return module, env, label, PIN files."""
        tools = find_tpm_tools()
        state = self._state()
        procs = state.get("procs", {})
        if all(_proc(procs.get(n)) for n in ("dbus", "swtpm", "abrmd")) and self._has_token():
            return self._info(state)
        self.down()
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        state = {"module": tools["module"], "label": self.label, "procs": {}}
        try:
            argv = [tools["dbus_daemon"], "--session", "--fork", "--print-address=1", "--print-pid=1"]
            out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout.split()
            state["dbus_address"], pid = out[0], int(out[1])
            state["procs"]["dbus"] = {"pid": pid, "create_time": psutil.Process(pid).create_time()}
            self._save(state)
            self._start_swtpm(state, tools, deadline)
            self._start_abrmd(state, tools, deadline)
            self._no_lockout(state)
            if not self._has_token():
                self._make_token(state, tools, deadline)
        except BaseException:
            self.down()
            raise
        return self._info(state)

    def _start_swtpm(self, state: dict[str, Any], tools: dict[str, str], deadline: float) -> None:
        """Start swtpm on the recorded ports (or a new free pair) and wait until it listens on both."""
        (self.directory / "swtpm-state").mkdir(exist_ok=True)
        for _ in range(5):
            port = state.get("port") or _free_port_pair()
            argv = [
                tools["swtpm"], "socket", "--tpm2",
                "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--flags", "not-need-init,startup-clear",
                "--tpmstate", f"dir={self.directory / 'swtpm-state'}",
            ]  # fmt: skip
            entry = state["procs"]["swtpm"] = self._spawn("swtpm", argv)
            self._save(state)

            def ready(e: dict[str, Any] = entry, p: int = port) -> bool:
                return _listening(e["pid"], (p, p + 1)) or not _proc(e)

            _wait("swtpm", ready, deadline, self.directory / "swtpm.log")
            if _proc(entry):
                state["port"] = port
                self._save(state)
                return
            if state.get("port"):  # a restart must keep its ports: they are what abrmd dials
                break
        raise TpmSetupError("swtpm exited at start; log:\n" + (self.directory / "swtpm.log").read_text()[-2000:])

    def _start_abrmd(self, state: dict[str, Any], tools: dict[str, str], deadline: float) -> None:
        """Start tpm2-abrmd on our bus, dialling swtpm; wait until it owns its name."""
        env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": state["dbus_address"]}
        tcti = f"--tcti=swtpm:host=127.0.0.1,port={state['port']}"
        # each module instance takes 2 of abrmd's connections: 27 by default, 100 at most
        argv = [tools["abrmd"], "--allow-root", "--session", "--max-connections=100", tcti]
        state["procs"]["abrmd"] = self._spawn("abrmd", argv, env)
        self._save(state)
        _wait("tpm2-abrmd", lambda: self._abrmd_ready(state, tools), deadline, self.directory / "abrmd.log")

    def _no_lockout(self, state: dict[str, Any]) -> None:
        """This TPM is killed mid-command on purpose, again and again: it counts each
        unorderly shutdown against its dictionary-attack protection and soon refuses every
        authorisation (the module answers CKR_PIN_LOCKED). Lift that protection on this
        throwaway device (recovery time 0: failures are not counted)."""
        tool = shutil.which("tpm2_dictionarylockout")
        if tool is None:
            raise TpmSetupError("tpm2_dictionarylockout is missing; install it with: apt-get install -y tpm2-tools")
        env = {**os.environ, **self.env(state), "TPM2TOOLS_TCTI": _TCTI}
        argv = [tool, "--setup-parameters", "--max-tries=1000", "--recovery-time=0", "--lockout-recovery-time=0"]
        for args in (argv, [tool, "--clear-lockout"]):
            r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise TpmSetupError(f"{' '.join(args[:2])} failed: {r.stderr.strip()[-500:]}")

    def _abrmd_ready(self, state: dict[str, Any], tools: dict[str, str]) -> bool:
        """True when tpm2-abrmd owns its name on our bus; raises if it has exited."""
        if not _proc(state["procs"]["abrmd"]):
            raise TpmSetupError("tpm2-abrmd exited; log:\n" + (self.directory / "abrmd.log").read_text()[-2000:])
        r = subprocess.run(
            [tools["dbus_send"], f"--bus={state['dbus_address']}", "--print-reply", "--dest=org.freedesktop.DBus",
             "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner", f"string:{_ABRMD_NAME}"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return r.returncode == 0 and "boolean true" in r.stdout

    def _has_token(self) -> bool:
        """True when the store already holds our token and both PIN files exist."""
        db = self.store / "tpm2_pkcs11.sqlite3"
        if not (db.exists() and self.pin_file.exists() and self.so_pin_file.exists()):
            return False
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
                return c.execute("SELECT 1 FROM tokens WHERE label = ?", (self.label,)).fetchone() is not None
        except sqlite3.Error:
            return False

    def _ptool(self, state: dict[str, Any], tools: dict[str, str], argv: list[str], pins: dict[str, str],
               deadline: float) -> str:  # fmt: skip
        """Run a tpm2_ptool command (PINs passed on stdin); return its stdout."""
        env = {**os.environ, **self.env(state), "TPM2TOOLS_TCTI": _TCTI}
        request = json.dumps({"argv": [*argv, f"--path={self.store}"], "pins": pins})
        r = subprocess.run([tools["ptool_python"], "-c", _PTOOL], input=request, capture_output=True, text=True,
                           env=env, timeout=max(deadline - time.monotonic(), 1))  # fmt: skip
        if r.returncode != 0:
            raise TpmSetupError(f"tpm2_ptool {argv[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return r.stdout

    def _make_token(self, state: dict[str, Any], tools: dict[str, str], deadline: float) -> None:
        """Create the store, a primary object and the token, with random PINs in 0600 files."""
        if self.store.exists():
            shutil.rmtree(self.store)
        self.store.mkdir()
        out = self._ptool(state, tools, ["init"], {}, deadline)
        pid = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("id:"))
        pins = {"userpin": secrets.token_hex(16), "sopin": secrets.token_hex(16)}
        for path, pin in ((self.pin_file, pins["userpin"]), (self.so_pin_file, pins["sopin"])):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(pin)
            os.chmod(path, 0o600)
        self._ptool(state, tools, ["addtoken", f"--pid={pid}", f"--label={self.label}"], pins, deadline)

    def down(self, timeout: float = 10.0) -> None:
        """Stop every recorded process (terminate, then kill after ``timeout``)."""
        state = self._state()
        entries = [e for n in ("abrmd", "swtpm", "dbus") if (e := state.get("procs", {}).get(n))]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for e in entries:
                if p := _proc(e):
                    with contextlib.suppress(psutil.Error):
                        p.send_signal(sig)
                        p.resume()  # a hung (stopped) swtpm cannot act on SIGTERM
            if _gone(entries, timeout):
                break
        if state:
            state["procs"] = {}
            self._save(state)

    # -- faults --------------------------------------------------------------------------
    def _swtpm(self) -> psutil.Process | None:
        return _proc(self._state().get("procs", {}).get("swtpm"))

    def kill_device(self) -> None:
        """SIGKILL swtpm (a device loss); waits until it is gone."""
        entry = self._state().get("procs", {}).get("swtpm")
        if entry and (p := _proc(entry)):
            p.kill()
            _gone([entry], 10)

    def hang_device(self) -> None:
        """SIGSTOP swtpm: the device stops answering but its sockets stay open."""
        if p := self._swtpm():
            p.suspend()
            _wait("SIGSTOP of swtpm", lambda: self.status()["device"] != "running", time.monotonic() + 10)

    def start_device(self, timeout: float = 30.0) -> None:
        """Bring the device back: SIGCONT swtpm if stopped; else start it on the same ports and
        state, with a fresh tpm2-abrmd (as after a reboot): the old resource manager's view of
        the TPM's object contexts died with the TPM, and it runs out of them if kept."""
        if p := self._swtpm():
            p.resume()
            return
        state = self._state()
        if not state.get("port"):
            raise TpmSetupError("the TPM device was never brought up (no state file); call up() first")
        tools = find_tpm_tools()
        deadline = time.monotonic() + timeout
        old = state["procs"].get("abrmd")  # first: no client may reach the TPM through it again
        if old and (p := _proc(old)):
            p.kill()  # at once: it would wait for its (dead) clients on SIGTERM
            _gone([old], 5)
        self._start_swtpm(state, tools, deadline)
        self._start_abrmd(state, tools, deadline)

    def status(self) -> dict[str, Any]:
        """Pids running per process, and the device state: running, stopped or dead."""
        state = self._state()
        procs = {n: _proc(e) for n, e in state.get("procs", {}).items()}
        running = {n: (p.pid if p else None) for n, p in procs.items()}
        swtpm = procs.get("swtpm")
        try:
            device = "dead" if not swtpm else "stopped" if swtpm.status() == psutil.STATUS_STOPPED else "running"
        except psutil.Error:
            device = "dead"
        return {"pids": running, "device": device, "port": state.get("port")}
