"""Figures measured in the harness process: recovery times, an HA group losing a member, the proxy delay."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench._cases import KEYS

__all__ = ["host_figures", "member_figures", "proxy_delay", "recovery_figures"]


# -- recovery figures, in this process ----------------------------------------------------------


def recovery_figures(bed: Any, tiny: bool) -> dict[str, Any]:
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


def member_figures(directory: Path, latency_ms: float, seconds: float, tiny: bool) -> dict[str, Any]:
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


def proxy_delay(bed: Any, ms: float) -> dict[str, float]:
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


def host_figures(setups: dict[str, dict[str, Any]], token: str, pin: str, tiny: bool) -> dict[str, Any]:
    """A host's start (spawn -> ``hello`` answered, the module loaded) and its RSS after it
    opened a session and signed 200 times, per setup; medians of sequential starts."""
    import psutil

    from p11guard.base import Secret
    from p11guard.host import HostProcess

    out: dict[str, Any] = {}
    for name, setup in setups.items():
        starts, rss = [], []
        for _ in range(3 if tiny else 10):
            t0 = time.perf_counter()
            host = HostProcess.spawn(setup["module"], env=setup["env"])
            starts.append(time.perf_counter() - t0)
            try:
                host.open(token, Secret(pin), 30)
                for i in range(200):
                    host.call("sign", {"key": KEYS["ecdsa"][0], "data": b"%d" % i}, 30)
                assert host.pid is not None
                rss.append(psutil.Process(host.pid).memory_info().rss / 2**20)
            finally:
                host.close()
        out[name] = {
            "ready_ms_p50": round(statistics.median(starts) * 1000, 1),
            "ready_ms_max": round(max(starts) * 1000, 1),
            "rss_mib_p50": round(statistics.median(rss), 2),
            "rss_mib_max": round(max(rss), 2),
        }
    return out
