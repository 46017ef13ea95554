"""``p11guard chaos``: a seeded fault schedule against a mixed workload, then invariants.

The schedule is a pure function of ``(seed, duration)``: the same seed gives the same
schedule, and it is printed. The workload runs from several threads; every operation is
recorded with its outcome, and at the end :func:`check` verifies the invariants on that
record (a function of the record alone, so it can be tested on a corrupted one).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from p11guard._guard import Guard
from p11guard.base import P11GuardError, UserError
from p11guard.testing._checker import Checker, OpRecord
from p11guard.testing._soak import maybe_sample, not_zombie, soak_verdict

__all__ = ["Checker", "Fault", "OpRecord", "check", "main", "make_schedule"]

KINDS = (
    "loss_short",
    "loss_long",
    "hang",
    "latency_spike",
    "flap",
    "kill_host",
    "inject_0x30",
    "inject_0xE0",
    "inject_0xB3",
    "probe_crash_in_recovery",
)


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    seconds: float = 0.0
    worker: int = 0
    ms: float = 0.0


#: Fault kinds a device backend (one device in-process: no proxy, no latency) can take.
DEVICE_KINDS = tuple(k for k in KINDS if k != "latency_spike")


def make_schedule(seed: int, duration_s: float, workers: int = 3, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """The faults of a run: a pure function of its arguments."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    t = 1.0
    while True:
        kind = rng.choice(kinds)
        seconds = {
            "loss_short": rng.uniform(0.3, 1.0),
            "loss_long": rng.uniform(2.0, 3.5),
            "hang": rng.uniform(1.5, 2.5),
            "latency_spike": rng.uniform(0.5, 1.5),
        }.get(kind, 0.0)
        fault = Fault(round(t, 2), kind, round(seconds, 2), rng.randrange(workers), float(rng.choice((5, 10, 20))))
        # each fault gets time to heal before the next one (recovery included)
        t += seconds + rng.uniform(2.5, 4.0)
        if t > duration_s - 1.0:
            break
        faults.append(fault)
    return faults


def check(
    records: list[OpRecord],
    status: dict[str, Any],
    public_pem: bytes | None,
    leaked_pids: list[int],
    fd_growth: int,
    final_state: str,
) -> list[str]:
    """Every invariant of a finished run's records (what :class:`Checker` does as they come)."""
    checker = Checker(public_pem)
    for r in records:
        checker.add(r)
    return checker.finish(status, leaked_pids, fd_growth, final_state)


class _Workload:
    def __init__(self, guard: Guard, seed: int, threads: int, round_trip: str, checker: Checker) -> None:
        self.guard = guard
        self.checker = checker
        self.round_trip = round_trip  # "gcm", "hmac" or "none": what the token can do
        self.seed = seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.seq = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _next(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def _record(self, rec: OpRecord) -> None:
        with self.lock:
            self.checker.add(rec)

    def _call(self, op: str, future: Future[Any]) -> tuple[Any, OpRecord]:
        rec = OpRecord(self._next(), op, "ok")
        try:
            return future.result(), rec
        except Exception as exc:
            rec.outcome, rec.error = "error", f"{type(exc).__name__}: {exc}"
            return None, rec

    def _run(self, tid: int) -> None:
        rng = random.Random(self.seed * 1000 + tid)  # the op mix; the schedule is separate
        g = self.guard
        last_sig: tuple[bytes, bytes] | None = None
        n = 0
        while not self.stop.is_set():
            n += 1
            pick = rng.random()
            if pick < 0.45:
                data = b"chaos %d-%d" % (tid, n)
                sig, rec = self._call("sign", g.submit_sign("chaos-ec", data))
                if sig is not None:
                    rec.check = {"data": data.hex(), "signature": sig.hex()}
                    last_sig = (data, sig)
            elif pick < 0.6 and last_sig is not None:
                valid, rec = self._call("verify", g.submit_verify("chaos-ec", *last_sig))
                rec.check = {"valid": valid}
            elif pick < 0.85 and self.round_trip == "hmac":
                data = os.urandom(rng.randrange(1, 64))
                mac, rec = self._call("hmac", g.submit_sign("chaos-hmac", data, "hmac-sha256"))
                if mac is not None:
                    valid, rec2 = self._call("hmac", g.submit_verify("chaos-hmac", data, mac, "hmac-sha256"))
                    rec = rec2 if rec2.outcome == "error" else rec
                    rec.check = {"valid": valid}
            elif pick < 0.85 and self.round_trip == "gcm":
                plain = os.urandom(rng.randrange(1, 64))
                ct, rec = self._call("encrypt_decrypt", g.submit_encrypt("chaos-aes", plain))
                if ct is not None:
                    out, rec2 = self._call("encrypt_decrypt", g.submit_decrypt("chaos-aes", ct))
                    rec.check = {"plain": plain.hex(), "decrypted": out.hex() if out is not None else None}
                    if rec2.outcome == "error":
                        rec = rec2
            elif pick < 0.98:
                _, rec = self._call("random", g.submit_random(32))
            else:
                label = f"chaos-gen-{self.seed}-{tid}-{n}"
                _, rec = self._call("generate_key_pair", g.submit_generate_key_pair(label, "ec-p256"))
            self._record(rec)
            if (rec.error or "").startswith(("GuardFailed", "GuardClosed")):
                return  # every further call would fail at once: stop, the checker reports it


def _apply(fault: Fault, bed: Any, guard: Guard) -> None:
    """Inject one fault and heal it (the healing waits are the schedule's own timing)."""
    if fault.kind in ("loss_short", "loss_long"):
        bed.fault("lose")
        time.sleep(fault.seconds)
        bed.fault("restore")
    elif fault.kind == "hang":
        bed.fault("hang")
        time.sleep(fault.seconds)
        bed.fault("restore")
    elif fault.kind == "latency_spike":
        bed.fault("latency", fault.ms)
        time.sleep(fault.seconds)
        bed.fault("latency", 0)
    elif fault.kind == "flap":
        for _ in range(3):
            bed.fault("lose")
            time.sleep(0.1)
            bed.fault("restore")
            time.sleep(0.1)
    elif fault.kind == "kill_host":
        pid = guard.host_pids().get(f"worker-{fault.worker}")
        if pid:
            os.kill(pid, signal.SIGKILL)
    elif fault.kind.startswith("inject_"):
        ckr = int(fault.kind.split("_")[1], 16)
        try:
            guard.inject_fault(fault.worker, "fail_next", ckr=ckr, count=1)
        except Exception:
            pass  # the worker may be restarting: the fault is then moot
    elif fault.kind == "probe_crash_in_recovery":
        bed.fault("lose")
        end = time.monotonic() + 5
        while guard.state != "RECOVERING" and time.monotonic() < end:
            time.sleep(0.01)
        pid = guard.host_pids().get("probe")
        if pid:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        bed.fault("restore")


def _round_trip(bed: Any, host: Any, say: Any) -> str:
    """Which secret-key round trip this token can do: AES-GCM, else HMAC, else none."""
    for label, ktype in (("chaos-aes", "aes-256"), ("chaos-hmac", "hmac-sha256")):
        try:
            bed.ensure_keys({label: ktype})
        except P11GuardError as exc:
            say(f"no {ktype} key on this token ({exc})")
    try:
        host.call("encrypt", {"key": "chaos-aes", "data": b"probe"})
        return "gcm"
    except UserError as exc:
        # p11-kit 0.24's RPC (the testbed) does not carry CK_GCM_PARAMS: it answers
        # CKR_MECHANISM_INVALID. Round-trip HMAC (sign + verify) takes the place of
        # encrypt + decrypt then, and the report says so.
        say(f"AES-GCM unavailable through this module ({exc.name})")
    try:
        host.call("sign", {"key": "chaos-hmac", "data": b"probe", "mechanism": "hmac-sha256"})
        return "hmac"
    except UserError as exc:
        say(f"HMAC unavailable through this module ({exc.name}): no secret-key round trips")
    return "none"


def run(seed: int, duration_s: float, soak: bool, say: Any, workdir: Path, backend: str = "softhsm") -> dict[str, Any]:
    import psutil

    from p11guard.host import HostProcess
    from p11guard.testbed import Testbed

    schedule = make_schedule(seed, duration_s, kinds=KINDS if backend == "softhsm" else DEVICE_KINDS)
    say(f"seed {seed}: {len(schedule)} faults over {duration_s:g} s")
    for f in schedule:
        say(f"  t={f.at_s:6.2f}s  {f.kind:<24} {f.seconds:4.1f}s  worker {f.worker}")
    bed = Testbed(workdir / "testbed")
    bed.up(backend=backend)
    rss: list[dict[str, Any]] = []
    try:
        config = bed.client_config(workers=3, call_s=1.5, probe_interval_s=0.5)
        bed.ensure_keys({"chaos-ec": "ec-p256"})
        host = HostProcess.spawn(config.module_path, env=config.module_env)
        host.open(bed.token_label, bed.pin, 30)
        pem = host.call("public_key", {"key": "chaos-ec"})
        round_trip = _round_trip(bed, host, say)
        host.close()
        me = psutil.Process()
        fds_before = me.num_fds()
        guard = Guard(config)
        pids: set[int] = set(guard.host_pids().values())
        checker = Checker(pem)
        work = _Workload(guard, seed, threads=4, round_trip=round_trip, checker=checker)
        for t in work.threads:
            t.start()
        start = time.monotonic()
        applied = 0
        for fault in schedule:
            while time.monotonic() - start < fault.at_s:
                pids |= set(guard.host_pids().values())
                if soak:
                    maybe_sample(rss, guard, start)
                time.sleep(min(0.25, max(0.0, fault.at_s - (time.monotonic() - start))))
            say(f"t={time.monotonic() - start:6.2f}s inject {fault.kind}")
            _apply(fault, bed, guard)
            applied += 1
        while time.monotonic() - start < duration_s:
            pids |= set(guard.host_pids().values())
            if soak:
                maybe_sample(rss, guard, start)
            time.sleep(0.25)
        # let the last fault heal, then stop the load
        end = time.monotonic() + 15
        while guard.state != "SERVING" and time.monotonic() < end:
            time.sleep(0.05)
        final_state = guard.state
        work.stop.set()
        for t in work.threads:
            t.join(90)
        status = guard.status()
        pids |= set(guard.host_pids().values())
        guard.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(psutil.pid_exists(p) and not_zombie(p) for p in pids):
            time.sleep(0.05)
        leaked = [p for p in pids if psutil.pid_exists(p) and not_zombie(p)]
        fd_growth = me.num_fds() - fds_before
        violations = checker.finish(status, leaked, fd_growth, final_state)
        soak_report: dict[str, Any] = {}
        if soak:
            soak_problems, soak_report = soak_verdict(rss, workdir, say)
            violations += soak_problems
    finally:
        bed.down()
    return {
        "ok": not violations,
        "seed": seed,
        "duration_s": duration_s,
        "ops": checker.ops,
        "errors": checker.errors,
        "outcome_unknown": checker.outcome_unknown,
        "soak": soak_report,
        "faults": applied,
        "recoveries": status["counters"]["recoveries"],
        "generation": status["generation"],
        "violations": violations,
        "schedule": [asdict(f) for f in schedule],
        "backend": backend,
        "round_trip": {
            "gcm": "aes-gcm encrypt+decrypt",
            "hmac": "hmac-sha256 sign+verify (no GCM through this module)",
        }.get(round_trip, "none (no AES-GCM or HMAC on this token)"),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="p11guard chaos")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--soak", action="store_true")
    parser.add_argument("--backend", default="softhsm", choices=("softhsm", "tpm"))
    opts = parser.parse_args(argv)
    return run_cli(opts.duration, opts.seed, opts.json, opts.soak, opts.backend)


def run_cli(duration: float, seed: int, as_json: bool, soak: bool, backend: str = "softhsm") -> int:
    def say(text: str) -> None:
        print(text, file=sys.stderr if as_json else sys.stdout, flush=True)

    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the testbed is stopped by pid.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="p11guard-chaos-") as tmp:
        result = run(seed, duration, soak, say, Path(tmp), backend)
    if as_json:
        print(json.dumps(result))
    else:
        print(
            f"\nops {result['ops']} (errors {result['errors']}, outcome unknown {result['outcome_unknown']}), "
            f"faults {result['faults']}, recoveries {result['recoveries']}, generation {result['generation']}"
        )
        for v in result["violations"]:
            print(f"VIOLATION: {v}")
        print("OK: every invariant holds" if result["ok"] else "FAILED")
    return 0 if result["ok"] else 1
