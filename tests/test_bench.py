"""The benchmark still runs (tiny mode: 0.2 s per case). No test asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench._report import goals, table


def test_bench_tiny_runs_every_contender(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--json", "--report", str(tmp_path)],
        cwd=Path(__file__).resolve().parent.parent,  # the harness is not installed
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(done.stdout.strip().splitlines()[-1])
    rows = data["results"]
    assert {r["setup"] for r in rows} == {"cpu", "net"} and {r["mech"] for r in rows} == {"ecdsa", "rsa"}
    errors = [(r["name"], r["error"]) for r in rows if r["error"]]
    assert errors == []
    assert all(r["ops_per_s"] and r["ops_per_s"] > 0 for r in rows), [r for r in rows if not r["ops_per_s"]]
    assert {"overhead_p50_us", "direct_p50_us"} <= data["latency"].keys()
    assert data["recovery"]["restore_to_first_op_s"] > 0
    members = data["members"]
    assert members["healthy_ops_per_s"] > 0 and members["one_lost_ops_per_s"] > 0
    assert members["failed_ops"] == 0 and members["group_recoveries"] == 0, members
    assert members["member_restore_to_first_op_s"] > 0
    listed = goals(data)
    assert len(listed) >= 11 and all(text and figure and met in (True, False, None) for text, met, figure in listed)
    assert all(r["name"] in table(data) for r in rows)  # one line per contender
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "| goal | met | figure |" in (tmp_path / "BENCHMARKS-section.md").read_text()
