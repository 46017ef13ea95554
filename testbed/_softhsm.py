"""SoftHSM2: find the tools, make the token (PINs through stdin, files 0600)."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from p11guard.testbed._procs import TestbedError, write_private

__all__ = ["find_tools", "init_softhsm_token"]

_INSTALL_HINT = "install them with: apt-get update && apt-get install -y softhsm2 p11-kit p11-kit-modules"


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


def init_softhsm_token(directory: Path, tools: dict[str, str], token_label: str, user_pin: str | None = None) -> None:
    """Make the SoftHSM2 token in ``directory/tokens`` once (``token.ready`` marks it done),
    with random SO and user PINs (or this ``user_pin``) in ``so.pin`` and ``user.pin``."""
    softhsm_conf = directory / "softhsm2.conf"
    pin_path = directory / "user.pin"
    tokens = directory / "tokens"
    ready = directory / "token.ready"
    if ready.exists():
        return
    shutil.rmtree(tokens, ignore_errors=True)  # a half-made token from an interrupted run
    tokens.mkdir(parents=True, exist_ok=True)
    softhsm_conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    user, so = user_pin or secrets.token_hex(8), secrets.token_hex(8)
    write_private(pin_path, user)
    write_private(directory / "so.pin", so)
    # PINs go through stdin: never on a command line.
    done = subprocess.run(
        [sys.executable, "-c", _INIT_TOKEN],
        input=json.dumps({"module": tools["softhsm"], "label": token_label, "so": so, "user": user}),
        env={**os.environ, "SOFTHSM2_CONF": str(softhsm_conf)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise TestbedError(f"cannot initialise the SoftHSM2 token: {tail[0]}")
    ready.write_text(token_label + "\n")
