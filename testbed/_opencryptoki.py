"""opencryptoki's software token (slot 3) as a second real PKCS#11 implementation for tests.

opencryptoki 3.8.1 is machine-wide: one ``pkcsslotd`` and one store, ``/var/lib/opencryptoki/swtok``
(``PKCS_APP_STORE`` is broken in 3.8.1: the files land in ``/``). The store gets an owner mark;
it is wiped and re-initialised only when factory-fresh or p11guard's, unused, and unclaimed by a
live testbed. ``C_InitToken`` over a non-default SO PIN breaks the token (SO login then fails with
``CKR_FUNCTION_FAILED``), so re-initialising first wipes the store back to factory state.
"""

import contextlib
import fcntl
import glob
import grp
import json
import os
import secrets
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from p11guard.testbed._procs import TestbedError, alive, read_state, wait_for, write_state

__all__ = ["OCK_SLOT", "OckSetupError", "OpencryptokiToken", "claim_token", "find_ock_tools"]

OCK_SLOT = 3
DEFAULT_SO_PIN = "87654321"
STORE = Path("/var/lib/opencryptoki/swtok")
OWNER_MARK = STORE / "p11guard-owner.json"
SHM_FILE = Path("/dev/shm/var.lib.opencryptoki.swtok")  # the token's shared state, named after STORE
LOCK_DIR = Path("/var/lock/opencryptoki")
_TOKEN_INITIALIZED = 0x400
_USER_PIN_INITIALIZED = 0x8
_INSTALL_HINT = "install them with: apt-get update && apt-get install -y opencryptoki opensc"


class OckSetupError(TestbedError):
    """opencryptoki cannot be set up as asked; the message says what to do."""


def find_ock_tools(pkcs11_tool: bool = False) -> dict[str, str]:
    """Locate the opencryptoki module, ``pkcsslotd``, ``pkcsconf`` (and OpenSC's ``pkcs11-tool``).

    Raises:
        OckSetupError: something is missing (names the Debian packages to install).
    """
    module = os.environ.get("P11GUARD_OCK_MODULE") or next(
        iter(glob.glob("/usr/lib/*/pkcs11/libopencryptoki.so") + glob.glob("/usr/lib/pkcs11/libopencryptoki.so")), ""
    )
    found = {
        "module": module if os.path.exists(module) else "",
        "pkcsslotd": shutil.which("pkcsslotd", path="/usr/sbin:/sbin:" + os.environ.get("PATH", "")) or "",
        "pkcsconf": shutil.which("pkcsconf", path="/usr/sbin:/sbin:" + os.environ.get("PATH", "")) or "",
    }
    if pkcs11_tool:
        found["pkcs11_tool"] = shutil.which("pkcs11-tool") or ""
    packages = {"module": "opencryptoki", "pkcsslotd": "opencryptoki", "pkcsconf": "opencryptoki"}
    missing = {packages.get(key, "opensc") for key, path in found.items() if not path}
    try:
        grp.getgrnam("pkcs11")  # made by opencryptoki's postinst; the daemon and store need it
    except KeyError:
        missing.add("opencryptoki")
    if missing:
        raise OckSetupError(f"missing Debian packages: {', '.join(sorted(missing))}; {_INSTALL_HINT}")
    return found


# Child scripts (PyKCS11 never loads in the caller). Secrets come on stdin only.
_PROBE = r"""
import json, sys, PyKCS11
lib = PyKCS11.PyKCS11Lib(); lib.load(sys.argv[1])
slots = list(lib.getSlotList(tokenPresent=True))
info = lib.getTokenInfo(int(sys.argv[2])) if int(sys.argv[2]) in slots else None
print(json.dumps({"slots": slots, "label": info.label.rstrip(" \x00") if info else None,
                  "flags": int(info.flags) if info else 0}))
"""

_INIT = r"""
import json, sys, PyKCS11
d = json.loads(sys.stdin.read())
lib = PyKCS11.PyKCS11Lib(); lib.load(d["module"])
lib.initToken(d["slot"], d["default_so"], d["label"].ljust(32))  # unpadded labels pick up garbage bytes
s = lib.openSession(d["slot"], PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
s.login(d["default_so"], PyKCS11.CKU_SO); s.setPin(d["default_so"], d["so"]); s.logout()
s.login(d["so"], PyKCS11.CKU_SO); s.initPin(d["user"]); s.logout()
s.login(d["user"], PyKCS11.CKU_USER); s.logout(); s.closeSession()
"""


def claim_token(timeout: float) -> int:
    """Claim the machine's soft token for as long as the returned descriptor is open (a test
    session that uses it): a second claimant waits up to ``timeout`` seconds, then gets an
    :class:`OckSetupError` -- two suites on one machine would re-initialise each other's token.
    A process that dies releases its claim."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_DIR / "p11guard-claim.lock", os.O_CREAT | os.O_RDWR, 0o660)

    def free() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    try:
        wait_for(free, timeout, "the opencryptoki soft token to be free (another test session uses it)")
    except TestbedError as exc:
        os.close(fd)
        raise OckSetupError(str(exc)) from None
    return fd


def _running_slotds() -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["name", "exe", "status"]):
        named = "pkcsslotd" in (proc.info["name"] or "", os.path.basename(proc.info["exe"] or ""))
        if named and proc.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(proc)
    return out


def _token_users() -> list[int]:
    """Pids of processes that have the soft token's shared state mapped (live clients)."""
    users = []
    for maps in glob.glob("/proc/[0-9]*/maps"):
        with contextlib.suppress(OSError):
            if str(SHM_FILE) in Path(maps).read_text():
                users.append(int(maps.split("/")[2]))
    return users


def _new_pin() -> str:
    """8 random letters and digits (opencryptoki's PINs are 4 to 8 characters)."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(8))


class OpencryptokiToken:
    """opencryptoki's soft token, with its ``pkcsslotd``, driven from ``directory``.

    ``directory`` holds ``ock-state.json`` (pids, token ownership), ``user.pin`` and
    ``so.pin`` (mode 0600) and ``pkcsslotd.log``; the token store itself is system-wide.
    """

    __test__ = False

    def __init__(self, directory: Path, token_label: str = "p11guard-test") -> None:
        if not 1 <= len(token_label) <= 32:
            raise OckSetupError("token_label must be 1 to 32 characters")
        self.dir = Path(directory).resolve()
        self.token_label = token_label
        self.state_path = self.dir / "ock-state.json"
        self.pin_path = self.dir / "user.pin"
        self.so_pin_path = self.dir / "so.pin"

    def _state(self, path: Path | None = None) -> dict[str, Any]:
        return read_state(path or self.state_path)

    def _save(self, state: dict[str, Any]) -> None:
        write_state(self.state_path, state)

    @property
    def is_up(self) -> bool:
        """True when the ``pkcsslotd`` recorded in our state still runs."""
        st = self._state()
        return alive(st.get("slotd_pid"), st.get("slotd_created"))

    def up(self, timeout: float = 60.0, fresh: bool = False) -> dict[str, Any]:
        """Start ``pkcsslotd`` if none runs, and make the soft token ours with fresh PINs.

        The token is reused (keys kept) when our state and the store's owner mark agree and
        ``fresh`` is false; otherwise it is wiped and re-initialised, if that is safe.

        Raises:
            OckSetupError: a package is missing, or the token belongs to someone else / is in use.
        """
        tools = find_ock_tools()
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in (LOCK_DIR, LOCK_DIR / "swtok", STORE.parent, STORE, STORE / "TOK_OBJ"):
            path.mkdir(parents=True, exist_ok=True)  # root:pkcs11 0770, as the package's tmpfiles.d says
            os.chown(path, 0, grp.getgrnam("pkcs11").gr_gid)
            path.chmod(0o770)
        with open(LOCK_DIR / "p11guard-testbed.lock", "a") as lock:  # one up() at a time per machine
            fcntl.flock(lock, fcntl.LOCK_EX)
            st = self._state()
            was_up = alive(st.get("slotd_pid"), st.get("slotd_created"))
            try:
                self._ensure_slotd(tools, st, timeout)
                probe = self._wait_slot(tools, timeout)
                if fresh or not self._is_ours(st, probe):
                    self._reinit(tools, st, probe)
            except BaseException:
                if not was_up:
                    self.down()  # stops pkcsslotd only if this call started it
                raise
        return self.info(tools)

    def info(self, tools: dict[str, str] | None = None) -> dict[str, Any]:
        """What a client needs: the module, its environment, label, slot and PIN files."""
        module = (tools or find_ock_tools())["module"]  # env: none; 3.8.1 takes its paths from /etc and built-ins
        out = {"module": module, "env": {}, "token_label": self.token_label, "slot": OCK_SLOT}
        return {**out, "pin_file": str(self.pin_path), "so_pin_file": str(self.so_pin_path)}

    def _ensure_slotd(self, tools: dict[str, str], st: dict[str, Any], timeout: float) -> None:
        if alive(st.get("slotd_pid"), st.get("slotd_created")):
            return
        running = _running_slotds()
        if running:  # a second pkcsslotd would steal the first one's shared memory: reuse, never own
            st.update(slotd_pid=running[0].pid, slotd_created=running[0].create_time(), slotd_owned=False)
            self._save(st)
            return
        with open(self.dir / "pkcsslotd.log", "ab") as log:  # -f: foreground, so its pid is ours to stop
            io: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": log}
            proc = subprocess.Popen([tools["pkcsslotd"], "-f"], start_new_session=True, **io)
        st.update(slotd_pid=proc.pid, slotd_created=psutil.Process(proc.pid).create_time(), slotd_owned=True)
        self._save(st)

        def ready() -> bool:
            if proc.poll() is not None:
                raise OckSetupError(f"pkcsslotd exited with {proc.returncode}; see {self.dir / 'pkcsslotd.log'}")
            return Path("/run/pkcsslotd.socket").exists()

        wait_for(ready, timeout, "pkcsslotd's socket")

    def _wait_slot(self, tools: dict[str, str], timeout: float) -> dict[str, Any]:
        """Poll (a fresh client process each time) until slot 3 is listed; return its token info."""
        seen: list[dict[str, Any]] = []
        cmd = [sys.executable, "-c", _PROBE, tools["module"], str(OCK_SLOT)]

        def visible() -> bool:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
            probe = json.loads(done.stdout) if done.returncode == 0 else {}
            if OCK_SLOT in probe.get("slots", ()):
                seen.append(probe)
            return bool(seen)

        wait_for(visible, timeout, f"slot {OCK_SLOT} to be visible to a client")
        return seen[0]

    def _is_ours(self, st: dict[str, Any], probe: dict[str, Any]) -> bool:
        nonce, pins = (st.get("token") or {}).get("nonce"), self.pin_path.exists() and self.so_pin_path.exists()
        usable = probe["label"] == self.token_label and bool(probe["flags"] & _USER_PIN_INITIALIZED)
        return bool(nonce) and nonce == self._state(OWNER_MARK).get("nonce") and usable and pins

    def _check_takeover(self, probe: dict[str, Any]) -> None:
        mark = self._state(OWNER_MARK)
        has_objects = any((STORE / "TOK_OBJ").iterdir())
        if not mark and (probe["flags"] & _TOKEN_INITIALIZED or has_objects):
            raise OckSetupError(
                f"the opencryptoki soft token in {STORE} was initialised by something other than p11guard "
                f"(label {probe['label']!r}); to hand it over, stop its users and delete its files: "
                f"rm -rf {STORE}/NVTOK.DAT {STORE}/MK_SO {STORE}/MK_USER {STORE}/TOK_OBJ/* {SHM_FILE}"
            )
        other = Path(str(mark.get("directory", ""))) / "ock-state.json"
        if mark and mark.get("directory") != str(self.dir) and other.exists():
            ost = self._state(other)
            if ost.get("slotd_owned") and alive(ost.get("slotd_pid"), ost.get("slotd_created")):
                raise OckSetupError(f"the opencryptoki soft token is in use by the testbed in {mark['directory']}")
        users = _token_users()
        if users:
            raise OckSetupError(f"processes {users} have the opencryptoki soft token open; stop them first")

    def _reinit(self, tools: dict[str, str], st: dict[str, Any], probe: dict[str, Any]) -> None:
        self._check_takeover(probe)
        # Back to factory state: C_InitToken over a non-default SO PIN leaves a broken token.
        for name in ("NVTOK.DAT", "MK_SO", "MK_USER", OWNER_MARK.name):
            with contextlib.suppress(FileNotFoundError):
                (STORE / name).unlink()
        for obj in (STORE / "TOK_OBJ").iterdir():
            obj.unlink()
        with contextlib.suppress(FileNotFoundError):
            SHM_FILE.unlink()
        st.pop("token", None)
        self._save(st)
        user, so = _new_pin(), _new_pin()
        for path, value in ((self.pin_path, user), (self.so_pin_path, so)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(value + "\n")
        payload = {"module": tools["module"], "slot": OCK_SLOT, "label": self.token_label, "user": user}
        stdin = json.dumps({**payload, "default_so": DEFAULT_SO_PIN, "so": so})  # PINs via stdin only
        done = subprocess.run([sys.executable, "-c", _INIT], input=stdin, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise OckSetupError(f"cannot initialise the opencryptoki soft token: {tail[0]}")
        nonce = secrets.token_hex(16)
        mark = {"directory": str(self.dir), "nonce": nonce, "label": self.token_label}
        OWNER_MARK.write_text(json.dumps(mark) + "\n")
        st["token"] = {"nonce": nonce, "label": self.token_label, "initialised": time.time()}
        self._save(st)

    def pids(self) -> list[int]:
        """The live ``pkcsslotd`` pid we recorded (owned or reused)."""
        st = self._state()
        return [st["slotd_pid"]] if alive(st.get("slotd_pid"), st.get("slotd_created")) else []

    def down(self, timeout: float = 4.0) -> None:
        """Stop the ``pkcsslotd`` we started, by pid; a reused one is left running. The token stays.

        ``pkcsslotd`` ignores SIGTERM while any client has the library initialised, so it is
        killed after ``timeout / 2``; a later start reclaims its shared memory.
        """
        st = self._state()
        if st.get("slotd_owned") and alive(st.get("slotd_pid"), st.get("slotd_created")):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(st["slotd_pid"])
                proc.terminate()
                if psutil.wait_procs([proc], timeout=timeout / 2)[1]:
                    proc.kill()
                    proc.wait(timeout / 2)
        for key in ("slotd_pid", "slotd_created", "slotd_owned"):
            st.pop(key, None)
        if st or self.state_path.exists():
            self._save(st)
