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
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._cases import CASES, KEYS, run_case
from bench._figures import host_figures, member_figures, proxy_delay, recovery_figures
from bench._report import add_ratios, table, write_report

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
    for w in (2,) if tiny else (2, 16):  # the service cases: single ops from many callers
        out.append(
            {
                "name": f"p11guard sign x16 threads, {w}w",
                "kind": "p11guard",
                "mode": "threads",
                "threads": 16,
                "workers": w,
            }
        )
        # tiny: fewer in flight, or no op would complete inside a 0.2 s window through the network
        asign = {"kind": "p11guard", "mode": "asign", "workers": w, "inflight": 16 if tiny else 256}
        out.append({"name": f"p11guard asign x256, {w}w", **asign})
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
                        runs = [run_case(args) for _ in range(opts.runs)]
                        good = [r["ops_per_s"] for r in runs if "ops_per_s" in r]
                        row = {
                            "setup": setup_name,
                            "mech": mech,
                            "name": contender["name"],
                            "ops_per_s": round(statistics.median(good), 1) if good else None,
                            "runs": [round(g, 1) for g in good],
                            "error": next((r["error"] for r in runs if "error" in r), None),
                        }
                        splits = [r["cpu_us_per_op"] for r in runs if r.get("cpu_us_per_op")]
                        if splits:  # each kind's median over the runs
                            row["cpu_us_per_op"] = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
                        rss = [r for r in runs if "rss_supervisor_mib" in r]
                        if rss:
                            row["rss_supervisor_mib"] = round(max(r["rss_supervisor_mib"] for r in rss), 1)
                            row["rss_host_max_mib"] = round(max(max(r["rss_hosts_mib"]) for r in rss), 1)
                        results.append(row)
                        say(
                            f"{setup_name:<4} {mech:<6} {contender['name']:<32} {row['ops_per_s']!s:>10} ops/s"
                            + (f"  ERROR {row['error']}" if row["error"] else "")
                        )
            floors = floor_figures(setups["cpu"], bed, pin, opts)
            proxy = proxy_delay(bed, opts.latency_ms)
            bed.fault("latency", 0)
            latency = _latency(setups["cpu"], bed, pin, opts)
            recovery = recovery_figures(bed, opts.tiny)
            hosts = host_figures(setups, bed.token_label, pin, opts.tiny)
        finally:
            bed.down()
        say("members: 3-member group, one member lost under load")
        members = member_figures(Path(tmp) / "members", opts.latency_ms, opts.seconds, opts.tiny)
    add_ratios(results)
    return {
        "results": results,
        "proxy": proxy,
        "floors": floors,
        "latency": latency,
        "recovery": recovery,
        "members": members,
        "hosts": hosts,
        "settings": {
            "seconds": opts.seconds,
            "runs": opts.runs,
            "latency_ms": opts.latency_ms,
            "cpus": os.cpu_count(),
        },
    }


def floor_figures(setup: dict[str, Any], bed: Any, pin: str, opts: argparse.Namespace) -> dict[str, Any]:
    """The floors under the service goals on this machine (bench/_floors.py)."""
    base = {**setup, "mech": "ecdsa", "token": bed.token_label, "pin": pin, "seconds": opts.seconds}
    handoff = run_case({**base, "kind": "handoff", "threads": 16, "warmup": opts.warmup})
    module = run_case({**base, "kind": "module", "warmup": opts.warmup})
    network = run_case({"kind": "network", "latency_ms": opts.latency_ms, "connections": 16, "seconds": opts.seconds})
    return {
        "handoff_us_16_threads": handoff.get("cpu_us_per_op"),
        "handoff_per_s_16_threads": round(handoff.get("ops_per_s", 0.0)),
        "module_sign_us": module.get("cpu_us_per_op"),
        **{f"network_{k}": v for k, v in network.items() if k != "error"},
        "errors": [e for e in (handoff.get("error"), module.get("error"), network.get("error")) if e],
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
    direct = run_case({**base, "kind": "pykcs11", "threads": 1})
    guard = run_case({**base, "kind": "p11guard", "mode": "threads", "threads": 1, "workers": 1})
    bare = run_case({**base, "kind": "host_batch", "batch": 1, "bed": str(bed.dir)})  # one op a frame, no guard

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6 if xs else float("nan")

    d, g, h = direct.get("latencies", []), guard.get("latencies", []), bare.get("latencies", [])
    return {
        "bare_host_p50_us": round(pct(h, 0.5), 1),
        "bare_host_overhead_p50_us": round(pct(h, 0.5) - pct(d, 0.5), 1),
        "direct_p50_us": round(pct(d, 0.5), 1),
        "direct_p99_us": round(pct(d, 0.99), 1),
        "p11guard_p50_us": round(pct(g, 0.5), 1),
        "p11guard_p99_us": round(pct(g, 0.99), 1),
        "overhead_p50_us": round(pct(g, 0.5) - pct(d, 0.5), 1),
        "overhead_p99_us": round(pct(g, 0.99) - pct(d, 0.99), 1),
    }


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
    parser.add_argument("--dask", action="store_true", help="only the Dask job against one guard (bench/_dask.py)")
    parser.add_argument("--partition-size", type=int, default=2000, help="--dask: records per partition")
    parser.add_argument(
        "--pipeline", action="store_true", help="sign and verify N records (and files) instead; see bench/_pipeline.py"
    )
    parser.add_argument(
        "--records", type=int, help="--pipeline: line records (default 1,000,000); --dask: records per run (20,000)"
    )
    parser.add_argument(
        "--dir-records", type=int, help="--pipeline: files (default: records, at most 100,000; 0: none)"
    )
    parser.add_argument("--skip-jobs-1", action="store_true", help="--pipeline: no verify --jobs 1 (a long run)")
    parser.add_argument(
        "--benchmarks-md",
        metavar="PATH",
        default=str(Path(__file__).resolve().parent.parent / "BENCHMARKS.md"),
        help="--pipeline: the file whose pipeline section is replaced (default: BENCHMARKS.md)",
    )
    opts = parser.parse_args(argv)
    if opts.case:
        print(json.dumps(CASES[json.loads(opts.case)["kind"]](json.loads(opts.case))))
        return 0
    if opts.records is None:
        opts.records = 1_000_000 if opts.pipeline else 20_000
    if opts.pipeline:
        return _pipeline(opts)
    if opts.tiny:
        opts.seconds, opts.warmup, opts.runs = 0.2, 0.1, 1

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if opts.dask:
        from bench._dask import dask_table, run_dask

        if opts.tiny:
            opts.runs = 1
        found = run_dask(opts, say)
        print(json.dumps(found) if opts.json else dask_table(found))
        return 0

    data = run_all(opts, say)
    if opts.json:
        print(json.dumps(data))
    else:
        print(table(data))
    if opts.report:
        say(f"report section: {write_report(data, Path(opts.report))}")
    return 0


def _pipeline(opts: argparse.Namespace) -> int:
    from bench._pipeline import pipeline_figures, pipeline_markdown, pipeline_table, write_section

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    dir_records = opts.dir_records if opts.dir_records is not None else min(opts.records, 100_000)
    data = pipeline_figures(opts.records, dir_records, say, one_job=not opts.skip_jobs_1)
    print(json.dumps(data) if opts.json else pipeline_table(data))
    if opts.report:
        Path(opts.report).mkdir(parents=True, exist_ok=True)
        (Path(opts.report) / "pipeline.json").write_text(json.dumps(data, indent=2) + "\n")
    write_section(Path(opts.benchmarks_md), pipeline_markdown(data), opts.records)
    say(f"pipeline section written to {opts.benchmarks_md}")
    failed = [s for part in ("lines", "directory") for s in data[part].values() if s["exit"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
