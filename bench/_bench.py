"""Benchmarks: p11guard against direct PyKCS11 and python-pkcs11, measured side by side.

``scripts/bench`` runs this (``python -m bench`` from the repository: the harness is not part
of the installed library). Every case runs in a fresh process (so no contender shares a
GIL, a module instance or a warm cache with another), on the same token and keys, after a
warm-up; each figure is the median of ``--runs`` runs; ratios are against the direct
PyKCS11 figures of the *same* run. Setups: (a) SoftHSM2 loaded directly (CPU-bound);
(b) the testbed with ``latency 1`` (a network HSM, 1 ms one way).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]

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


def _case_pykcs11(a: dict[str, Any]) -> dict[str, Any]:
    import PyKCS11

    os.environ.update(a["env"])
    lib = PyKCS11.PyKCS11Lib()
    lib.load(a["module"])
    slot = next(s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.rstrip(" \0") == a["token"])
    flags = PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
    first = lib.openSession(slot, flags)
    first.login(a["pin"])
    label = KEYS[a["mech"]][0]
    ckm = PyKCS11.CKM_ECDSA if a["mech"] == "ecdsa" else PyKCS11.CKM_SHA256_RSA_PKCS
    mech = PyKCS11.Mechanism(ckm)

    def prepare(i: int) -> tuple[Any, Any]:
        session = first if i == 0 else lib.openSession(slot, flags)  # one session per thread
        template = [(PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY)]
        return session, session.findObjects(template)[0]

    def step(ctx: tuple[Any, Any], i: int, n: int) -> int:
        session, key = ctx
        bytes(session.sign(key, _payload(a, i, n), mech))  # users need bytes: convert like they must
        return 1

    return _measure(a, a["threads"], prepare, step)


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
        else:

            def one(ctx: None, i: int, n: int) -> int:
                g.sign(label, b"record %d-%d" % (i, n), mechanism)
                return 1

            out = _measure(a, a["threads"], lambda i: None, one)
        out["rss_supervisor_mib"] = psutil.Process().memory_info().rss / 2**20
        out["rss_hosts_mib"] = [psutil.Process(p).memory_info().rss / 2**20 for p in g.host_pids().values()]
    return out


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


_CASES = {
    "pykcs11": _case_pykcs11,
    "python-pkcs11": _case_python_pkcs11,
    "p11guard": _case_p11guard,
    "host_batch": _case_host_batch,
}


def _run_case(args: dict[str, Any]) -> dict[str, Any]:
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


# -- recovery figures, in this process ----------------------------------------------------------


def _recovery_figures(bed: Any, tiny: bool) -> dict[str, Any]:
    from p11guard import Config, Guard

    config = Config.from_file(bed.config_path).replace(
        workers=4, call_s=2.0, probe_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.5
    )
    label, _, mechanism = KEYS["ecdsa"]
    done: list[float] = []
    stop = threading.Event()
    with Guard(config) as g:
        transitions: list[tuple[float, str]] = []
        g.on_state_change(lambda old, new, info: transitions.append((time.monotonic(), new)))

        def load() -> None:
            while not stop.is_set():
                try:
                    g.sign(label, b"x", mechanism)
                    done.append(time.monotonic())
                except Exception:
                    pass

        threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()

        def wait_state(name: str, since: float, timeout: float = 30.0) -> float:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                for at, state in list(transitions):
                    if state == name and at >= since:
                        return at
                time.sleep(0.002)  # polling the recorded transitions
            return float("nan")

        out: dict[str, Any] = {}
        time.sleep(0.2 if tiny else 1.0)  # steady load first
        t_lose = time.monotonic()
        bed.fault("lose")
        out["lose_to_lost_s"] = wait_state("LOST", t_lose) - t_lose
        wait_state("RECOVERING", t_lose)
        time.sleep(0.3)
        t_restore = time.monotonic()
        bed.fault("restore")
        wait_state("SERVING", t_restore)
        end = time.monotonic() + 10
        while not any(d >= t_restore for d in list(done)) and time.monotonic() < end:
            time.sleep(0.002)  # polling for the first op after restore
        after = [d for d in list(done) if d >= t_restore]
        out["restore_to_first_op_s"] = (min(after) - t_restore) if after else float("nan")
        out["backoff_max_s"] = config.backoff_max_s
        time.sleep(0.3)
        t_hang = time.monotonic()
        bed.fault("hang")
        out["hang_to_recovering_s"] = wait_state("RECOVERING", t_hang) - t_hang
        out["hang_goal_s"] = config.call_s + config.probe_s + 1
        bed.fault("restore")
        t_r2 = time.monotonic()
        out["hang_restore_to_serving_s"] = wait_state("SERVING", t_r2) - t_r2
        stop.set()
        for t in threads:
            t.join(10)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _member_figures(directory: Path, latency_ms: float, seconds: float, tiny: bool) -> dict[str, Any]:
    """A group of 3 members, 2 workers each, 8 client threads: the rate while healthy and
    while one member is lost (from the ``lose``, detection included), failed ops, and the
    time from that member's ``restore`` to its first op."""
    from p11guard import Config, Guard
    from p11guard.testbed import Testbed

    bed = Testbed(directory)
    bed.up(members=3)
    try:
        label, ktype, mechanism = KEYS["ecdsa"]
        bed.ensure_keys({label: ktype})
        bed.fault("latency", latency_ms)
        config = Config.from_file(bed.config_path).replace(
            workers=6, call_s=2.0, probe_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.5
        )
        window = 0.5 if tiny else seconds * 2
        done: list[float] = []
        failed: list[str] = []
        stop = threading.Event()
        with Guard(config) as g:

            def member_state(name: str) -> str:
                return str(next(m["state"] for m in g.status()["members"] if m["name"] == name))

            def wait(cond: Any, timeout: float = 30.0) -> None:
                end = time.monotonic() + timeout
                while not cond() and time.monotonic() < end:
                    time.sleep(0.002)  # polling a condition with a deadline

            wait(lambda: all(m["state"] == "serving" for m in g.status()["members"]))

            def load() -> None:
                while not stop.is_set():
                    try:
                        g.sign(label, b"x", mechanism)
                        done.append(time.monotonic())
                    except Exception as exc:
                        failed.append(f"{type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(0.2 if tiny else 1.0)  # steady load first

            def rate(start: float) -> float:
                time.sleep(window)  # the measuring window
                return sum(1 for d in list(done) if start <= d < start + window) / window

            healthy = rate(time.monotonic())
            t_lose = time.monotonic()
            bed.fault("lose", member="hsm-b")
            during = rate(t_lose)
            wait(lambda: member_state("hsm-b") == "lost")

            def b_ops() -> int:
                return sum(w["ops"] for w in g.status()["workers"] if w["member"] == "hsm-b")

            t_restore = time.monotonic()
            bed.fault("restore", member="hsm-b")
            wait(lambda: b_ops() > 0)
            first_op = time.monotonic() - t_restore
            stop.set()
            for t in threads:
                t.join(10)
            status = g.status()
    finally:
        bed.down()
    return {
        "healthy_ops_per_s": round(healthy, 1),
        "one_lost_ops_per_s": round(during, 1),
        "one_lost_ratio": round(during / healthy, 3) if healthy else None,
        "failed_ops": len(failed),
        "first_failure": failed[0] if failed else None,
        "member_restore_to_first_op_s": round(first_op, 4),
        "group_recoveries": status["counters"]["recoveries"],
        "backoff_max_s": config.backoff_max_s,
        "latency_ms": latency_ms,
    }


def _proxy_delay(bed: Any, ms: float) -> dict[str, float]:
    """The one-way delay the fault proxy really adds, measured on `random` round trips."""
    from p11guard import Config
    from p11guard.host import HostProcess

    config = Config.from_file(bed.config_path)
    host = HostProcess.spawn(config.module_path, env=config.module_env)
    try:
        host.open(bed.token_label, bed.pin, 30)

        def rtt() -> float:
            samples = []
            for _ in range(50):
                t = time.perf_counter()
                host.call("random", {"n": 8})
                samples.append(time.perf_counter() - t)
            return statistics.median(samples)

        bed.fault("latency", 0)
        base = rtt()
        bed.fault("latency", ms)
        slow = rtt()
    finally:
        host.kill()
    # one `random` call is one RPC round trip: two proxy hops
    return {
        "set_ms": ms,
        "rtt0_ms": round(base * 1e3, 3),
        "rtt_ms": round(slow * 1e3, 3),
        "added_one_way_ms": round((slow - base) * 1e3 / 2, 3),
    }


# -- the whole run ------------------------------------------------------------------------------


def _contenders(tiny: bool) -> list[dict[str, Any]]:
    workers = (1, 2) if tiny else (1, 2, 8, 16)
    out: list[dict[str, Any]] = [
        {"name": "PyKCS11 1 thread", "kind": "pykcs11", "threads": 1},
        {"name": "PyKCS11 8 threads", "kind": "pykcs11", "threads": 8},
        {"name": "python-pkcs11 1 thread", "kind": "python-pkcs11", "threads": 1},
        {"name": "python-pkcs11 8 threads", "kind": "python-pkcs11", "threads": 8},
        {"name": "one host, batch 64", "kind": "host_batch", "batch": 64},
    ]
    for w in workers:
        out.append(
            {
                "name": f"p11guard sign x8 threads, {w}w",
                "kind": "p11guard",
                "mode": "threads",
                "threads": 8,
                "workers": w,
            }
        )
        out.append({"name": f"p11guard sign_many, {w}w", "kind": "p11guard", "mode": "sign_many", "workers": w})
    return out


def _setup_keys(bed: Any) -> None:
    from p11guard import Config
    from p11guard.host import HostProcess

    config = Config.from_file(bed.direct_config_path)
    host = HostProcess.spawn(config.module_path, env=config.module_env)
    try:
        host.open(bed.token_label, bed.pin, 30)
        have = {k["label"] for k in host.call("list_keys")}
        for label, ktype, _ in KEYS.values():
            if label not in have:
                host.call("generate_key_pair", {"label": label, "type": ktype}, 120)
    finally:
        host.close()


def run_all(opts: argparse.Namespace, say: Any) -> dict[str, Any]:
    from p11guard.testbed import Testbed, find_tools

    tools = find_tools()
    proxy_module = next(iter(Path("/usr/lib").glob("*/p11-kit-proxy.so")), None)
    with tempfile.TemporaryDirectory(prefix="p11guard-bench-") as tmp:
        bed = Testbed(Path(tmp) / "testbed")
        bed.up()
        try:
            _setup_keys(bed)
            pin = bed.pin.reveal()
            setups = {
                "cpu": {
                    "config": str(bed.direct_config_path),
                    "module": tools["softhsm"],
                    "env": {"SOFTHSM2_CONF": str(bed.softhsm_conf)},
                    "pkcs11_module": str(proxy_module or tools["softhsm"]),
                },
                "net": {
                    "config": str(bed.config_path),
                    "module": tools["client"],
                    "env": {"P11_KIT_SERVER_ADDRESS": bed.server_address},
                    "pkcs11_module": tools["client"],
                },
            }
            results: list[dict[str, Any]] = []
            for setup_name, setup in setups.items():
                if setup_name == "net":
                    bed.fault("latency", opts.latency_ms)
                for mech in ("ecdsa", "rsa"):
                    for contender in _contenders(opts.tiny):
                        args = {
                            **setup,
                            **contender,
                            "mech": mech,
                            "token": bed.token_label,
                            "pin": pin,
                            "seconds": opts.seconds,
                            "warmup": opts.warmup,
                            "bed": str(bed.dir),
                        }
                        runs = [_run_case(args) for _ in range(opts.runs)]
                        good = [r["ops_per_s"] for r in runs if "ops_per_s" in r]
                        row = {
                            "setup": setup_name,
                            "mech": mech,
                            "name": contender["name"],
                            "ops_per_s": round(statistics.median(good), 1) if good else None,
                            "runs": [round(g, 1) for g in good],
                            "error": next((r["error"] for r in runs if "error" in r), None),
                        }
                        rss = [r for r in runs if "rss_supervisor_mib" in r]
                        if rss:
                            row["rss_supervisor_mib"] = round(max(r["rss_supervisor_mib"] for r in rss), 1)
                            row["rss_host_max_mib"] = round(max(max(r["rss_hosts_mib"]) for r in rss), 1)
                        results.append(row)
                        say(
                            f"{setup_name:<4} {mech:<6} {contender['name']:<32} {row['ops_per_s']!s:>10} ops/s"
                            + (f"  ERROR {row['error']}" if row["error"] else "")
                        )
            proxy = _proxy_delay(bed, opts.latency_ms)
            bed.fault("latency", 0)
            latency = _latency(setups["cpu"], bed, pin, opts)
            recovery = _recovery_figures(bed, opts.tiny)
        finally:
            bed.down()
        say("members: 3-member group, one member lost under load")
        members = _member_figures(Path(tmp) / "members", opts.latency_ms, opts.seconds, opts.tiny)
    _add_ratios(results)
    return {
        "results": results,
        "proxy": proxy,
        "latency": latency,
        "recovery": recovery,
        "members": members,
        "settings": {
            "seconds": opts.seconds,
            "runs": opts.runs,
            "latency_ms": opts.latency_ms,
            "cpus": os.cpu_count(),
        },
    }


def _latency(setup: dict[str, Any], bed: Any, pin: str, opts: argparse.Namespace) -> dict[str, Any]:
    base = {
        **setup,
        "mech": "ecdsa",
        "token": bed.token_label,
        "pin": pin,
        "seconds": opts.seconds,
        "warmup": opts.warmup,
        "latency": True,
    }
    direct = _run_case({**base, "kind": "pykcs11", "threads": 1})
    guard = _run_case({**base, "kind": "p11guard", "mode": "threads", "threads": 1, "workers": 1})

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6 if xs else float("nan")

    d, g = direct.get("latencies", []), guard.get("latencies", [])
    return {
        "direct_p50_us": round(pct(d, 0.5), 1),
        "direct_p99_us": round(pct(d, 0.99), 1),
        "p11guard_p50_us": round(pct(g, 0.5), 1),
        "p11guard_p99_us": round(pct(g, 0.99), 1),
        "overhead_p50_us": round(pct(g, 0.5) - pct(d, 0.5), 1),
        "overhead_p99_us": round(pct(g, 0.99) - pct(d, 0.99), 1),
    }


def _add_ratios(results: list[dict[str, Any]]) -> None:
    for row in results:
        same = [r for r in results if r["setup"] == row["setup"] and r["mech"] == row["mech"]]
        one = next((r["ops_per_s"] for r in same if r["name"] == "PyKCS11 1 thread"), None)
        best = max((r["ops_per_s"] or 0 for r in same if r["name"].startswith("PyKCS11")), default=0)
        row["x_pykcs11_1t"] = round(row["ops_per_s"] / one, 2) if row["ops_per_s"] and one else None
        row["x_best_pykcs11"] = round(row["ops_per_s"] / best, 2) if row["ops_per_s"] and best else None


def _find(results: list[dict[str, Any]], setup: str, mech: str, name: str) -> dict[str, Any]:
    return next((r for r in results if (r["setup"], r["mech"], r["name"]) == (setup, mech, name)), {})


def goals(data: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """Each goal of the benchmark issue: (goal, met?, the figures)."""
    r = data["results"]
    out: list[tuple[str, bool | None, str]] = []

    def ratio(setup: str, mech: str, name: str, key: str = "x_pykcs11_1t") -> float | None:
        value = _find(r, setup, mech, name).get(key)
        return float(value) if value is not None else None

    def add(goal: str, value: float | None, want: float, unit: str = "x") -> None:
        out.append(
            (
                goal,
                None if value is None else value >= want,
                f"{value}{unit}" if value is not None else "not measured",
            )
        )

    add(
        "CPU-bound RSA-2048: p11guard 2 workers >= 1.6x PyKCS11 1 thread",
        max(
            filter(
                None,
                [ratio("cpu", "rsa", "p11guard sign x8 threads, 2w"), ratio("cpu", "rsa", "p11guard sign_many, 2w")],
            ),
            default=None,
        ),
        1.6,
    )
    add(
        "CPU-bound ECDSA P-256: sign_many 2 workers >= 1.5x PyKCS11 1 thread",
        ratio("cpu", "ecdsa", "p11guard sign_many, 2w"),
        1.5,
    )
    add(
        "Latency-bound ECDSA: p11guard 16 workers >= 10x best PyKCS11",
        max(
            filter(
                None,
                [
                    ratio("net", "ecdsa", "p11guard sign x8 threads, 16w", "x_best_pykcs11"),
                    ratio("net", "ecdsa", "p11guard sign_many, 16w", "x_best_pykcs11"),
                ],
            ),
            default=None,
        ),
        10,
    )
    pk8 = _find(r, "net", "ecdsa", "python-pkcs11 8 threads").get("ops_per_s")
    g16 = max(
        filter(
            None,
            [
                _find(r, "net", "ecdsa", "p11guard sign x8 threads, 16w").get("ops_per_s"),
                _find(r, "net", "ecdsa", "p11guard sign_many, 16w").get("ops_per_s"),
            ],
        ),
        default=None,
    )
    add(
        "Latency-bound ECDSA: p11guard 16 workers >= python-pkcs11 8 threads",
        round(g16 / pk8, 2) if g16 and pk8 else None,
        1.0,
    )
    add(
        "One host, batch frames of 64 ECDSA >= 0.9x direct PyKCS11",
        ratio("cpu", "ecdsa", "one host, batch 64"),
        0.9,
    )
    lat = data["latency"]
    out.append(("Single-op overhead p50 <= 150 us", lat["overhead_p50_us"] <= 150, f"{lat['overhead_p50_us']} us"))
    rec = data["recovery"]
    out.append(
        (
            "restore -> first success <= backoff_max_s + 0.5 s",
            rec["restore_to_first_op_s"] <= rec["backoff_max_s"] + 0.5,
            f"{rec['restore_to_first_op_s']} s",
        )
    )
    out.append(
        (
            "first failing call -> LOST <= 0.2 s (measured from `lose`)",
            rec["lose_to_lost_s"] <= 0.2,
            f"{rec['lose_to_lost_s']} s",
        )
    )
    out.append(
        (
            "hang -> recovery started <= call_s + probe_s + 1 s",
            rec["hang_to_recovering_s"] <= rec["hang_goal_s"],
            f"{rec['hang_to_recovering_s']} s (goal {rec['hang_goal_s']} s)",
        )
    )
    mem = data.get("members")
    if mem:
        out.append(
            (
                "one member of 3 lost: >= 60% of the healthy rate and no failed op",
                mem["one_lost_ratio"] is not None and mem["one_lost_ratio"] >= 0.6 and mem["failed_ops"] == 0,
                f"{mem['one_lost_ratio']}x ({mem['one_lost_ops_per_s']} of {mem['healthy_ops_per_s']} ops/s), "
                f"{mem['failed_ops']} failed",
            )
        )
        out.append(
            (
                "member restore -> its first op <= backoff_max_s + 0.5 s",
                mem["member_restore_to_first_op_s"] <= mem["backoff_max_s"] + 0.5,
                f"{mem['member_restore_to_first_op_s']} s",
            )
        )
    hosts = [row["rss_host_max_mib"] for row in r if "rss_host_max_mib" in row]
    out.append(("host RSS <= 40 MiB", max(hosts) <= 40 if hosts else None, f"{max(hosts) if hosts else '?'} MiB max"))
    return out


def table(data: dict[str, Any]) -> str:
    lines = [f"{'setup':<5} {'mech':<6} {'contender':<34} {'ops/s':>10} {'x PyKCS11 1t':>13} {'x best PyKCS11':>15}"]
    for r in data["results"]:
        lines.append(
            f"{r['setup']:<5} {r['mech']:<6} {r['name']:<34} {r['ops_per_s']!s:>10} "
            f"{r['x_pykcs11_1t']!s:>13} {r['x_best_pykcs11']!s:>15}"
        )
    lines.append("")
    lines.append(
        f"proxy: latency {data['proxy']['set_ms']} ms set, {data['proxy']['added_one_way_ms']} ms really added one way"
    )
    lines.append("single op (ECDSA, CPU-bound, 1 thread): " + ", ".join(f"{k} {v}" for k, v in data["latency"].items()))
    lines.append("recovery: " + ", ".join(f"{k} {v}" for k, v in data["recovery"].items()))
    if data.get("members"):
        lines.append("members: " + ", ".join(f"{k} {v}" for k, v in data["members"].items()))
    lines.append("")
    for goal, met, figure in goals(data):
        lines.append(f"[{'MET' if met else 'NOT MET' if met is False else '?'}] {goal}: {figure}")
    return "\n".join(lines)


def _chart(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("cpu", "ecdsa"), ("cpu", "rsa"), ("net", "ecdsa"), ("net", "rsa")]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    for ax, (setup, mech) in zip(axes.flat, panels, strict=True):
        rows = [r for r in data["results"] if r["setup"] == setup and r["mech"] == mech]
        names = [r["name"] for r in rows]
        values = [r["ops_per_s"] or 0 for r in rows]
        colors = ["#888888" if not r["name"].startswith(("p11guard", "one host")) else "#1f77b4" for r in rows]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        where = "SoftHSM2 direct (CPU-bound)" if setup == "cpu" else "testbed, 1 ms one way (network)"
        ax.set_title(f"{'ECDSA P-256' if mech == 'ecdsa' else 'RSA-2048'} - {where}")
        ax.set_xlabel("signatures/s")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_report(data: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _chart(data, directory / "bench.png")
    (directory / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    md = [
        "## Measured (scripts/bench)",
        "",
        f"{data['settings']['cpus']} cores; {data['settings']['runs']} runs of {data['settings']['seconds']} s per "
        "figure (median), after a warm-up; each case in a fresh process.",
        "",
        "![ops/s by contender and setup](bench-report/bench.png)",
        "",
        "| setup | mech | contender | ops/s | x PyKCS11 1 thread | x best PyKCS11 |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in data["results"]:
        md.append(
            f"| {r['setup']} | {r['mech']} | {r['name']} | {r['ops_per_s']} | {r['x_pykcs11_1t']} | "
            f"{r['x_best_pykcs11']} |"
        )
    md += ["", "| goal | met | figure |", "|---|---|---|"]
    for goal, met, figure in goals(data):
        md.append(f"| {goal} | {'yes' if met else 'no' if met is False else '?'} | {figure} |")
    p = data["proxy"]
    md += [
        "",
        f"Proxy delay: `latency {p['set_ms']}` really adds {p['added_one_way_ms']} ms one way "
        f"(round trip {p['rtt0_ms']} ms -> {p['rtt_ms']} ms).",
        "",
        "Single op: " + ", ".join(f"{k} {v}" for k, v in data["latency"].items()),
        "",
        "Recovery: " + ", ".join(f"{k} {v}" for k, v in data["recovery"].items()),
        "",
    ]
    if data.get("members"):
        md += ["Members (3, one lost): " + ", ".join(f"{k} {v}" for k, v in data["members"].items()), ""]
    section = directory / "BENCHMARKS-section.md"
    section.write_text("\n".join(md))
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="0.2 s per case, 1 run: only proves it runs")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--report", metavar="DIR", help="write bench.json, bench.png and a BENCHMARKS.md section")
    opts = parser.parse_args(argv)
    if opts.case:
        print(json.dumps(_CASES[json.loads(opts.case)["kind"]](json.loads(opts.case))))
        return 0
    if opts.tiny:
        opts.seconds, opts.warmup, opts.runs = 0.2, 0.1, 1

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    data = run_all(opts, say)
    if opts.json:
        print(json.dumps(data))
    else:
        print(table(data))
    if opts.report:
        say(f"report section: {write_report(data, Path(opts.report))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
