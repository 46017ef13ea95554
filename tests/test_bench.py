"""The benchmark still runs (tiny mode: 0.2 s per case). No test asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench._pipeline import pipeline_markdown, section_title, write_section
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
    assert {"overhead_p50_us", "direct_p50_us", "bare_host_overhead_p50_us"} <= data["latency"].keys()
    floors = data["floors"]  # what this machine allows: measured, not assumed
    assert floors["errors"] == [] and floors["handoff_us_16_threads"] > 0 and floors["module_sign_us"] > 0, floors
    assert floors["network_rtt_ms_1_connections"] > 0 and floors["network_rtt_ms_16_connections"] > 0, floors
    # CPU per op by process kind (psutil counts in 10 ms ticks: a tiny window of a slow case may read 0)
    split = {(r["setup"], r["name"]): r["cpu_us_per_op"] for r in rows if r["name"].startswith("p11guard")}
    assert all(s.keys() == {"parent", "hosts", "hsm_side", "idle_pct"} for s in split.values()), split
    assert split["cpu", "p11guard sign_many, 2w"]["hosts"] > 0, split
    assert split["net", "p11guard sign_many, 2w"]["hsm_side"] > 0, split  # the testbed's proxy and server
    assert data["recovery"]["restore_to_first_op_s"] > 0
    members = data["members"]
    assert members["healthy_ops_per_s"] > 0 and members["one_lost_ops_per_s"] > 0
    assert members["failed_ops"] == 0 and members["group_recoveries"] == 0, members
    assert members["member_restore_to_first_op_s"] > 0
    listed = goals(data)
    assert len(listed) >= 11 and all(text and figure and met in (True, False, None) for text, met, figure in listed)
    service = [figure for text, _, figure in listed if text.startswith("Service, CPU-bound")]
    assert service and all("budget at the goal" in figure for figure in service), service
    assert all(r["name"] in table(data) for r in rows)  # one line per contender
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "| goal | met | figure |" in (tmp_path / "BENCHMARKS-section.md").read_text()


def test_bench_pipeline_runs_and_writes_its_section(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    argv = [sys.executable, "-m", "bench", "--pipeline", "--records", "1500", "--dir-records", "300"]
    done = subprocess.run(
        [*argv, "--json", "--benchmarks-md", str(md)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(done.stdout.strip().splitlines()[-1])
    steps = {
        **{f"lines {k}": v for k, v in data["lines"].items()},
        **{f"dir {k}": v for k, v in data["directory"].items()},
    }
    assert all(s["exit"] == 0 and s["wall_s"] > 0 and s["peak_rss_mib"] > 0 for s in steps.values()), steps
    assert "records 1500, signed 1500" in steps["lines sign"]["summary"][0]
    assert "records 1500, valid 1500" in steps["lines verify --jobs 1"]["summary"][0]
    assert "records 300, signed 0, skipped 300" in steps["dir sign again (all done)"]["summary"][0]
    assert steps["lines sign again (all done)"]["children"] == 0  # no guard: no host process
    text = md.read_text()
    assert text.count(section_title(1500)) == 1 and "kept" in text and "| 1,500 lines | `sign` |" in text
    data["lines"]["sign"]["wall_s"] = 1234.5
    write_section(md, pipeline_markdown(data), 1500)  # a later run of as many records replaces it
    write_section(md, pipeline_markdown({**data, "records": 7}), 7)  # another size adds its own
    text = md.read_text()
    assert text.count(section_title(1500)) == 1 and "| 1,500 lines | `sign` | 1234.5 |" in text
    assert text.count(section_title(7)) == 1 and "| 7 lines | `sign` |" in text and "kept" in text
