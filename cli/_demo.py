"""The demo: batch signing through a total loss of the HSM group, then independent verification.

Run with ``./scripts/demo`` (or ``python -m p11guard.cli._demo``). Starts a testbed in a
temporary directory, creates a key, writes sample records, runs ``p11guard sign`` on them
and, about a third of the way in, makes the whole group disappear for about 3 seconds;
then verifies every signature with ``cryptography`` and prints a summary. Everything it
started is torn down, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from p11guard.cli._verify import run_verify
from p11guard.testbed import Testbed

__all__ = ["main"]


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "p11guard", *args]


def run(
    records: int, outage_s: float, work: Path, quiet: bool, say: Any, timeline: Path | None = None
) -> dict[str, Any]:
    """Run the demo in ``work``; returns the summary. ``timeline``: draw the run there (PNG)."""
    bed = Testbed(work / "testbed")
    sign: subprocess.Popen[bytes] | None = None
    try:
        say(f"starting the simulated HSM group in {bed.dir} ...")
        bed.up()
        config = str(bed.config_path)
        subprocess.run(
            _cli("keygen", "--config", config, "--label", "demo-key", "--type", "ec-p256", "--exist-ok"),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        pub = work / "demo-key.pem"
        subprocess.run(_cli("pubkey", "--config", config, "--key", "demo-key", "--out", str(pub)), check=True)
        data = work / "records.txt"
        with data.open("w") as fh:
            for i in range(1, records + 1):
                fh.write(f"ledger entry {i:08d}: amount={i * 7 % 10007} currency=EUR\n")
        out, report = work / "signatures.jsonl", work / "report.json"
        say(f"signing {records} records; the whole group is lost about a third of the way in ...")
        sign = subprocess.Popen(
            _cli(
                "sign",
                "--config",
                config,
                "--key",
                "demo-key",
                "--in",
                str(data),
                "--out",
                str(out),
                "--report",
                str(report),
                *(["--timeline", str(timeline.resolve())] if timeline is not None else []),
                *(["--quiet"] if quiet else []),
            ),
            stdout=subprocess.DEVNULL if quiet else None,
        )
        lost_at = restored_at = None
        while sign.poll() is None:
            if lost_at is None and _lines(out) >= records // 3:
                bed.fault("lose")
                lost_at = time.time()
                say(f"\n*** group LOST at {_lines(out)} signatures (all connections cut) ***")
            elif lost_at is not None and restored_at is None and time.time() - lost_at >= outage_s:
                bed.fault("restore")
                restored_at = time.time()
                say("*** group RESTORED ***")
            time.sleep(0.05)  # the demo's own pacing; tests never sleep like this
        if restored_at is None and lost_at is not None:
            bed.fault("restore")
        if sign.returncode != 0:
            raise SystemExit(f"p11guard sign exited with {sign.returncode}")
        result = json.loads(report.read_text())
        verified = run_verify(data, out, pub)
        after = [s["end"] for s in result["stalls"] if restored_at and s["end"] >= restored_at]
        return {
            "records": records,
            "signed": result["signed"],
            "verified": verified.valid,
            "lost": verified.count("missing"),
            "duplicates": verified.count("duplicate"),
            "invalid": verified.count("invalid") + verified.count("tampered"),
            "recoveries": result["recoveries"],
            "outage_s": result["outage_s"],
            "time_to_recover_s": round(min(after) - restored_at, 3) if after and restored_at else None,
            "elapsed_s": result["elapsed_s"],
            "ops_per_s": result["ops_per_s"],
        }
    finally:
        if sign is not None and sign.poll() is None:
            sign.kill()
            sign.wait()
        bed.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object, last")
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--outage", type=float, default=3.0, help="seconds the group stays lost")
    parser.add_argument("--timeline", metavar="T.png", help="draw the run: signatures per second and the states")
    opts = parser.parse_args(argv)
    if opts.timeline:
        from p11guard.cli._timeline import require_matplotlib

        require_matplotlib()

    def say(text: str) -> None:
        print(text, file=sys.stderr if opts.json else sys.stdout, flush=True)

    with tempfile.TemporaryDirectory(prefix="p11guard-demo-") as tmp:
        try:
            summary = run(
                opts.records, opts.outage, Path(tmp), opts.json, say, Path(opts.timeline) if opts.timeline else None
            )
        except KeyboardInterrupt:
            print("demo interrupted; everything it started is stopped", file=sys.stderr)
            return 130
    ok = summary["lost"] == 0 and summary["duplicates"] == 0 and summary["verified"] == summary["records"]
    if opts.json:
        print(json.dumps(summary))
    else:
        ttr = summary["time_to_recover_s"]
        print(
            f"\nrecords {summary['records']}, signed {summary['signed']}, "
            f"verified {summary['verified']} (cryptography, no HSM)\n"
            f"recoveries {summary['recoveries']}, outage {summary['outage_s']:.1f} s, "
            f"restore -> first new signature {ttr if ttr is not None else '?'} s\n"
            f"lost {summary['lost']}, duplicates {summary['duplicates']}, invalid {summary['invalid']}\n"
            + ("OK: exactly one valid signature per record" if ok else "FAILED")
        )
        if opts.timeline:
            print(f"timeline: {opts.timeline}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
