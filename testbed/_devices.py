"""Testbeds of one device loaded in-process: opencryptoki's soft token, a software TPM.

The SoftHSM2 group (``softhsm``, the default) is a *network* HSM: p11-kit servers behind
fault proxies (:mod:`._testbed`). These backends are other PKCS#11 implementations,
loaded by each client: ``opencryptoki`` (a second token implementation, with other
mechanisms and gaps; nothing to lose: the token runs inside the client) and ``tpm`` (a real
device behind a socket, really lost when ``swtpm`` is killed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p11guard.testbed._opencryptoki import OpencryptokiToken
from p11guard.testbed._procs import TestbedError
from p11guard.testbed._tpm import TpmDevice

__all__ = [
    "BACKENDS",
    "DEVICE_FAULTS",
    "Device",
    "device_fault",
    "device_for",
    "device_running",
    "write_device_config",
]

#: Backends a testbed runs.
BACKENDS = ("softhsm", "opencryptoki", "tpm")
#: Faults of a device backend; the group's names (``lose``, ``restore``, ``hang``) mean
#: the same there, so the pytest plugin's ``hsm_faults`` work on every backend.
DEVICE_FAULTS = {
    "kill-device": "kill",
    "lose": "kill",
    "start-device": "start",
    "restore": "start",
    "hang-device": "hang",
    "hang": "hang",
}

Device = TpmDevice | OpencryptokiToken


def device_for(backend: str, directory: Path, token_label: str) -> Device:
    if backend == "tpm":
        return TpmDevice(directory, token_label)
    if backend == "opencryptoki":
        return OpencryptokiToken(directory, token_label)
    raise TestbedError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def device_fault(device: Device, name: str) -> None:
    """Apply a fault by name to a device backend."""
    action = DEVICE_FAULTS.get(name)
    if action is None:
        known = ", ".join(DEVICE_FAULTS)
        raise TestbedError(f"fault {name!r} is not one of a device backend's ({known})")
    if not isinstance(device, TpmDevice):
        raise TestbedError(
            "the opencryptoki soft token runs inside each client: there is no device to lose or hang; "
            "use --backend tpm (a device) or softhsm (a network group) for faults"
        )
    if action == "kill":
        device.kill_device()
    elif action == "start":
        device.start_device()
    else:
        device.hang_device()


def device_running(device: Device) -> bool:
    if isinstance(device, TpmDevice):
        return bool(device.status()["pids"].get("abrmd"))
    return device.is_up


def write_device_config(directory: Path, backend: str, info: dict[str, Any]) -> str:
    """``p11guard.toml`` for a device backend (written also as ``direct.toml``: it is in-process)."""
    env = ", ".join(f'{k} = "{v}"' for k, v in sorted(info["env"].items()))
    text = (
        f"# Written by `p11guard testbed up --backend {backend}`: {backend} loaded in-process.\n"
        f'[module]\npath = "{info["module"]}"\n'
        + (f"env = {{ {env} }}\n" if env else "")
        + f'\n[group]\ntoken_label = "{info["token_label"]}"\npin_file = "{info["pin_file"]}"\n\n'
        "[timeouts]\nprobe_interval_s = 1.0\n\n"
        "[recovery]\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.5\n\n"
        "[testing]\nfault_injection = true\n"
    )
    for name in ("p11guard.toml", "direct.toml"):
        (directory / name).write_text(text)
    return text
