"""Does exporting metrics slow a guard down? ``python -m bench.metrics_overhead``.

Signs with 8 client threads (and ``sign_many``) on SoftHSM2 loaded directly -- the fastest
operations, where a per-operation cost shows most -- with a guard without metrics and one
registered on a registry that is scraped every second, alternating, in fresh processes;
prints the median rate of each. No test asserts a speed: this is for the record.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KEY = "overhead-key"


def _one(config_path: str, metrics: bool, mode: str, seconds: float) -> float:
    from p11guard import Config, Guard

    config = Config.from_file(config_path).replace(workers=2)
    with Guard(config) as g:
        stop = threading.Event()
        scraper = None
        if metrics:
            from prometheus_client import CollectorRegistry, generate_latest

            from p11guard.metrics import register

            registry = CollectorRegistry()
            register(g, registry)

            def scrape() -> None:
                while not stop.wait(1.0):
                    generate_latest(registry)

            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
        for _ in range(200):
            g.sign(KEY, b"warm-up")
        done = [0] * 8
        end = time.monotonic() + seconds

        def client(i: int) -> None:
            n = 0
            while time.monotonic() < end:
                if mode == "threads":
                    g.sign(KEY, b"%d-%d" % (i, n))
                    n += 1
                else:
                    n += len(g.sign_many(KEY, [b"%d-%d-%d" % (i, n, k) for k in range(256)]))
            done[i] = n

        clients = [threading.Thread(target=client, args=(i,)) for i in range(8 if mode == "threads" else 1)]
        start = time.monotonic()
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        rate = sum(done) / (time.monotonic() - start)
        stop.set()
        return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "METRICS", "MODE"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        config, metrics, mode = opts.child
        print(json.dumps(_one(config, metrics == "1", mode, opts.seconds)))
        return 0
    from p11guard.testbed import Testbed

    with tempfile.TemporaryDirectory(prefix="p11guard-overhead-") as tmp:
        bed = Testbed(Path(tmp) / "bed")
        bed.up()  # for its direct.toml: SoftHSM2 in-process; the servers stay idle
        try:
            bed.ensure_keys({KEY: "ec-p256"})
        finally:
            bed.down()
        config = str(bed.direct_config_path)
        for mode in ("threads", "sign_many"):
            rates: dict[str, list[float]] = {"without": [], "with": []}
            for _ in range(opts.rounds):
                for name, flag in (("without", "0"), ("with", "1")):
                    cmd = [sys.executable, "-m", "bench.metrics_overhead", "--seconds", str(opts.seconds)]
                    done = subprocess.run([*cmd, "--child", config, flag, mode], capture_output=True, text=True)
                    rates[name].append(float(done.stdout.strip().splitlines()[-1]))
            a, b = statistics.median(rates["without"]), statistics.median(rates["with"])
            print(
                f"{mode:9s}: without metrics {a:,.0f}/s, with metrics {b:,.0f}/s ({(b / a - 1) * 100:+.1f} %); "
                f"runs without {[round(r) for r in rates['without']]}, with {[round(r) for r in rates['with']]}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
