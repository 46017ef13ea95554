"""One benchmark case in its own process: direct PyKCS11, python-pkcs11, p11guard, a bare host."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._floors import CpuWindow, case_handoff, case_network

__all__ = ["CASES", "KEYS", "run_case"]

KEYS = {
    "ecdsa": ("bench-ec", "ec-p256", "ecdsa-sha256"),
    "rsa": ("bench-rsa", "rsa-2048", "rsa-pkcs1-sha256"),
}


# -- one case, in its own process -------------------------------------------------------------


def _measure(
    a: dict[str, Any],
    threads: int,
    prepare: Callable[[int], Any],
    step: Callable[[Any, int, int], int],
) -> dict[str, Any]:
    """Run ``step`` from ``threads`` threads after a warm-up; the rate of whole steps.

    ``prepare(i)`` runs in thread ``i`` before the clock starts (sessions, keys);
    ``step(ctx, i, n)`` does some work and returns how many operations it did.
    """
    events: list[tuple[float, float, int]] = []
    latencies: list[float] = []
    start_evt, deadline = threading.Event(), [0.0, 0.0]
    ready = threading.Barrier(threads + 1)

    def run(i: int) -> None:
        ctx = prepare(i)
        ready.wait()
        start_evt.wait()
        n = 0
        # to the deadline, and at least one whole step after the warm-up
        while (now := time.perf_counter()) < deadline[0] or (now >= deadline[1] and not events):
            done = step(ctx, i, n)
            end = time.perf_counter()
            if a.get("latency") and i == 0:
                latencies.append(end - now)
            n += 1
            if now >= deadline[1]:
                events.append((now, end, done))

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for th in ts:
        th.start()
    ready.wait()
    t0 = time.perf_counter()
    deadline[:] = [t0 + a["warmup"] + a["seconds"], t0 + a["warmup"]]
    start_evt.set()
    for th in ts:
        th.join()
    span = max(e[1] for e in events) - min(e[0] for e in events) if events else 0.0
    return {
        "ops_per_s": sum(e[2] for e in events) / span if span > 0 else 0.0,
        "latencies": latencies[len(latencies) // 10 :],
    }


def _payload(a: dict[str, Any], i: int, n: int) -> bytes:
    msg = b"record %d-%d" % (i, n)
    return hashlib.sha256(msg).digest() if a["mech"] == "ecdsa" else msg  # raw ECDSA: hash first


def _pykcs11_login(a: dict[str, Any]) -> tuple[Any, Any, int, Any]:
    """PyKCS11 on the case's module and token: the library, the slot, the session flags and
    a logged-in session."""
    import PyKCS11

    os.environ.update(a["env"])
    lib = PyKCS11.PyKCS11Lib()
    lib.load(a["module"])
    slot = next(s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.rstrip(" \0") == a["token"])
    flags = PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
    session = lib.openSession(slot, flags)
    session.login(a["pin"])
    return lib, slot, flags, session


def _private_key(session: Any, a: dict[str, Any]) -> Any:
    import PyKCS11

    template = [(PyKCS11.CKA_LABEL, KEYS[a["mech"]][0]), (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY)]
    return session.findObjects(template)[0]


def _case_pykcs11(a: dict[str, Any]) -> dict[str, Any]:
    import PyKCS11

    lib, slot, flags, first = _pykcs11_login(a)
    ckm = PyKCS11.CKM_ECDSA if a["mech"] == "ecdsa" else PyKCS11.CKM_SHA256_RSA_PKCS
    mech = PyKCS11.Mechanism(ckm)

    def prepare(i: int) -> tuple[Any, Any]:
        session = first if i == 0 else lib.openSession(slot, flags)  # one session per thread
        return session, _private_key(session, a)

    def step(ctx: tuple[Any, Any], i: int, n: int) -> int:
        session, key = ctx
        bytes(session.sign(key, _payload(a, i, n), mech))  # users need bytes: convert like they must
        return 1

    return _measure(a, a["threads"], prepare, step)


def _case_module(a: dict[str, Any]) -> dict[str, Any]:
    """The module's own ECDSA signing, in-process: ``C_SignInit`` + ``C_Sign`` by ctypes on
    PyKCS11's session (the host's fast path), one thread -- so CPU per op is time per op."""
    import PyKCS11

    from p11guard.host._fastcall import FastSigner, handle_value

    *_, session = _pykcs11_login(a)
    key, handle = handle_value(_private_key(session, a)), handle_value(session.session)
    fast = FastSigner(a["module"])
    if not fast.shares_state(handle):
        return {"error": "the module hands out a fresh instance per C_GetFunctionList: no in-process fast path"}

    def step(ctx: None, i: int, n: int) -> int:
        rv, _ = fast.sign(handle, PyKCS11.CKM_ECDSA, key, _payload(a, i, n), 64)
        if rv:
            raise OSError(f"C_Sign answered 0x{rv:x}")
        return 1

    out = _measure(a, 1, lambda i: None, step)
    out["cpu_us_per_op"] = round(1e6 / out["ops_per_s"], 1) if out["ops_per_s"] else None
    return out


def _case_python_pkcs11(a: dict[str, Any]) -> dict[str, Any]:
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    os.environ.update(a["env"])
    # python-pkcs11 calls C_Initialize(NULL): SoftHSM2 then runs without locks and crashes
    # under threads. Loaded through p11-kit's proxy it gets CKF_OS_LOCKING_OK.
    lib: Any = pkcs11.lib(a["pkcs11_module"])
    token = lib.get_token(token_label=a["token"])
    label = KEYS[a["mech"]][0]
    mech = Mechanism.ECDSA if a["mech"] == "ecdsa" else Mechanism.SHA256_RSA_PKCS
    login = token.open(user_pin=a["pin"])  # login is per application: other sessions share it

    def prepare(i: int) -> Any:
        session = login if i == 0 else token.open()
        return session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)

    def step(key: Any, i: int, n: int) -> int:
        key.sign(_payload(a, i, n), mechanism=mech)
        return 1

    return _measure(a, a["threads"], prepare, step)


def _case_p11guard(a: dict[str, Any]) -> dict[str, Any]:
    import psutil

    from p11guard import Config, Guard

    config = Config.from_file(a["config"]).replace(workers=a["workers"], batch_size=64)
    label, _, mechanism = KEYS[a["mech"]]
    with Guard(config) as g:
        window = CpuWindow(a.get("bed"), list(g.host_pids().values()), a["warmup"], a["seconds"])
        if a["mode"] == "sign_many":
            # One sign_many call over a list sized to take about half the window, as a
            # batch pipeline would: calibrated from a first call of one batch per worker.
            calib = 64 * int(a["workers"])
            t = time.perf_counter()
            g.sign_many(label, [b"calibrate %d" % k for k in range(calib)], mechanism)
            chunk = max(calib, int(calib / max(time.perf_counter() - t, 1e-6) * a["seconds"] / 2))

            def step(ctx: None, i: int, n: int) -> int:
                g.sign_many(label, [b"record %d-%d" % (n, k) for k in range(chunk)], mechanism)
                return chunk

            out = _measure(a, 1, lambda i: None, step)
        elif a["mode"] == "asign":
            out = _measure_async(a, g, label, mechanism)
        else:

            def one(ctx: None, i: int, n: int) -> int:
                g.sign(label, b"record %d-%d" % (i, n), mechanism)
                return 1

            out = _measure(a, a["threads"], lambda i: None, one)
        out["cpu_us_per_op"] = window.per_op(out["ops_per_s"])
        out["rss_supervisor_mib"] = psutil.Process().memory_info().rss / 2**20
        out["rss_hosts_mib"] = [psutil.Process(p).memory_info().rss / 2**20 for p in g.host_pids().values()]
    return out


def _measure_async(a: dict[str, Any], g: Any, label: str, mechanism: str) -> dict[str, Any]:
    """``inflight`` coroutines each awaiting ``asign`` in a loop, as a service's handlers do;
    the rate of completions from the end of the warm-up to the last one (callers go on past
    the deadline until one has completed after the warm-up: with 256 in flight on a slow
    HSM a single call can outlast a short window)."""
    import asyncio

    inflight = int(a.get("inflight", 256))

    async def run() -> tuple[int, float]:
        start = time.perf_counter() + a["warmup"]
        end = start + a["seconds"]
        count, last = 0, start

        async def caller(i: int) -> None:
            nonlocal count, last
            n = 0
            while time.perf_counter() < end or not count:
                await g.asign(label, b"record %d-%d" % (i, n), mechanism)
                n += 1
                if (done := time.perf_counter()) >= start:
                    count, last = count + 1, max(last, done)

        await asyncio.gather(*(caller(i) for i in range(inflight)))
        return count, last - start

    count, elapsed = asyncio.run(run())
    return {"ops_per_s": count / elapsed if elapsed > 0 else 0.0}


def _case_host_batch(a: dict[str, Any]) -> dict[str, Any]:
    from p11guard import Config
    from p11guard.host import HostProcess
    from p11guard.testbed import Testbed

    config = Config.from_file(a["config"])
    host = HostProcess.spawn(config.module_path, env=config.module_env)
    try:
        host.open(a["token"], Testbed(a["bed"]).pin, 30)
        label, _, mechanism = KEYS[a["mech"]]
        items = [("sign", {"key": label, "data": b"record %d" % i, "mechanism": mechanism}) for i in range(a["batch"])]

        def step(ctx: None, i: int, n: int) -> int:
            host.call_batch(items, 60)
            return len(items)

        return _measure(a, 1, lambda i: None, step)
    finally:
        host.kill()


CASES = {
    "pykcs11": _case_pykcs11,
    "python-pkcs11": _case_python_pkcs11,
    "p11guard": _case_p11guard,
    "host_batch": _case_host_batch,
    "handoff": case_handoff,
    "network": case_network,
    "module": _case_module,
}


def run_case(args: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--case", json.dumps(args)],
        cwd=Path(__file__).resolve().parent.parent,  # the harness is not installed: run it from the repository
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
