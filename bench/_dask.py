"""The Dask job against one guard: ``python -m bench --dask``.

On the testbed's network group with ``latency`` ms one way (default 1), signs the same
line input three ways -- the single-machine job with one guard of 2 and of 4 workers, and
``sign --dask`` on a local cluster of 2 worker processes with a guard of 2 workers each (4
sessions, as the second) -- in that order, ``--runs`` times; rates are records over the
job's own time (guards started, cluster already up). Then, ``--runs`` times: a worker
``kill -9``-ed while it signs a partition, and the time until that partition's part file
is written by the other worker. No test asserts any of it.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

KEY = "bench-dask"


def _records(path: Path, n: int) -> Path:
    path.write_text("".join(f"bench record {i}\n" for i in range(1, n + 1)))
    return path


def _single(config_path: str, workers: int, source: Path, out: Path) -> float:
    from p11guard import Config
    from p11guard.cli._signjob import run_sign

    report = run_sign(Config.from_file(config_path).replace(workers=workers), KEY, source, out, quiet=True)
    assert report.ok and report.signed == report.records, report.summary()
    return report.signed / report.elapsed_s


def _dask(config_path: str, client: Any, source: Path, out: Path, partition_size: int) -> float:
    from p11guard.cluster import sign_on_cluster

    report = sign_on_cluster(config_path, KEY, source, out, scheduler=client, quiet=True, partition_size=partition_size)
    assert report.ok and report.signed == report.records, report.summary()
    return report.signed / report.elapsed_s


def _kill_to_signed(config_path: str, client: Any, source: Path, out: Path) -> dict[str, float]:
    """Kill -9 a worker while it signs; seconds until its partition's part is written."""
    from p11guard.base import poll_until
    from p11guard.cluster import sign_on_cluster

    result: dict[str, Any] = {}

    def job() -> None:
        result["report"] = sign_on_cluster(
            config_path, KEY, source, out, scheduler=client, quiet=True, partition_size=500
        )

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    poll_until(lambda: len(list(out.glob("part-*.jsonl"))) >= 2, 120, "2 partitions")
    busy: dict[str, Any] = {}

    def signing() -> bool:
        busy.update({w: [k for k in keys if "p11guard-part-" in str(k)] for w, keys in client.processing().items()})
        return any(busy.values())

    poll_until(signing, 30, "a worker signing a partition")
    victim = next(w for w, keys in busy.items() if keys)
    parts = [out / f"part-{int(str(k).rsplit('-', 1)[1]):05d}.jsonl" for k in busy[victim]]
    parts = [p for p in parts if not p.exists()]
    pid = client.run(os.getpid, workers=[victim])[victim]
    keys = set(busy[victim])
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def elsewhere() -> bool:
        now = client.processing()
        return any(keys & set(tasks) for w, tasks in now.items() if w != victim) or all(p.exists() for p in parts)

    poll_until(elsewhere, 120, "the killed worker's partitions on another worker")
    moved = time.monotonic() - killed
    poll_until(lambda: all(p.exists() for p in parts), 120, "the killed worker's partitions signed elsewhere")
    seconds = time.monotonic() - killed
    thread.join(120)
    report = result["report"]
    assert report.ok, report.summary()
    client.wait_for_workers(2, timeout=60)
    return {"kill_to_signed_s": round(seconds, 3), "kill_to_moved_s": round(moved, 3), "partitions": len(parts)}


def run_dask(opts: argparse.Namespace, say: Any) -> dict[str, Any]:
    """The figures (see the module)."""
    import logging

    from distributed import Client, LocalCluster

    from p11guard.testbed import Testbed

    n = 2_000 if opts.tiny else opts.records
    runs = 1 if opts.tiny else opts.runs
    with tempfile.TemporaryDirectory(prefix="p11guard-bench-dask-") as tmp:
        root = Path(tmp)
        bed = Testbed(root / "bed")
        bed.up()
        cluster = client = None
        try:
            bed.ensure_keys({KEY: "ec-p256"})
            bed.fault("latency", opts.latency_ms)
            config = str(bed.config_path)
            source = _records(root / "records.txt", n)
            started = time.monotonic()
            cluster = LocalCluster(n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1",
                                   scheduler_port=0, dashboard_address="127.0.0.1:0",
                                   silence_logs=logging.CRITICAL)  # fmt: skip
            client = Client(cluster)
            client.wait_for_workers(2, timeout=60)
            cluster_s = time.monotonic() - started
            rates: dict[str, list[float]] = {"guard_2w": [], "guard_4w": [], "dask_2x2w": []}
            for i in range(runs):
                rates["guard_2w"].append(_single(config, 2, source, root / f"single2-{i}.jsonl"))
                rates["guard_4w"].append(_single(config, 4, source, root / f"single4-{i}.jsonl"))
                rates["dask_2x2w"].append(_dask(config, client, source, root / f"dask-{i}", opts.partition_size))
                say(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()))
            kills = [_kill_to_signed(config, client, source, root / f"kill-{i}") for i in range(runs)]
            say("kill -9 to signed elsewhere: " + ", ".join(f"{k['kill_to_signed_s']:.2f} s" for k in kills))
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
            bed.down()
    medians = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    return {
        "records": n,
        "latency_ms": opts.latency_ms,
        "partition_size": opts.partition_size,
        "rates": medians,
        "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "dask_vs_guard_4w": round(medians["dask_2x2w"] / medians["guard_4w"], 2),
        "dask_vs_guard_2w": round(medians["dask_2x2w"] / medians["guard_2w"], 2),
        "cluster_start_s": round(cluster_s, 2),
        "kill_to_signed_s": [k["kill_to_signed_s"] for k in kills],
        "kill_to_moved_s": [k["kill_to_moved_s"] for k in kills],
        "cpus": os.cpu_count(),
    }


def dask_table(data: dict[str, Any]) -> str:
    r = data["rates"]
    kills = data["kill_to_signed_s"]
    return "\n".join(
        [
            f"{data['records']:,} records, latency {data['latency_ms']:g} ms one way, "
            f"partitions of {data['partition_size']}, {data['cpus']} CPUs (medians of {len(data['runs']['guard_2w'])})",
            f"  one guard, 2 workers        {r['guard_2w']:>8,.0f} signatures/s",
            f"  one guard, 4 workers        {r['guard_4w']:>8,.0f} signatures/s",
            f"  Dask, 2 workers x 2         {r['dask_2x2w']:>8,.0f} signatures/s "
            f"({data['dask_vs_guard_4w']:.2f}x one guard of 4, {data['dask_vs_guard_2w']:.2f}x of 2)",
            f"  local cluster start         {data['cluster_start_s']:>8.2f} s",
            f"  kill -9 -> on another worker {statistics.median(data['kill_to_moved_s']):>7.2f} s "
            f"(runs: {data['kill_to_moved_s']})",
            f"  kill -9 -> signed elsewhere {statistics.median(kills):>8.2f} s (runs: {kills}; partitions of 500)",
        ]
    )
