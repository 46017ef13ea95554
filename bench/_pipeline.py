"""The main job at pipeline scale: ``p11guard sign`` and ``verify`` over N records.

``scripts/bench --pipeline [--records N] [--dir-records M] [--skip-jobs-1]`` runs, each as
its own ``python -m p11guard`` process on the bench's own testbed (SoftHSM2 in-process,
ECDSA P-256, ``workers`` = cores): for N lines of a file, ``sign``, ``verify --jobs 1``,
``verify`` on every core, and a ``sign`` again that finds everything done; for M files in
folders of 1,000, the same without ``verify --jobs 1``. Each step: wall time, rate, the peak
RSS of its largest process (``ru_maxrss``) and of its whole process tree (sampled every
0.2 s), and how many child processes it started (a resume that starts a guard starts
hosts). Before the steps, how much faster two processes verify ECDSA than one on this
machine (the ceiling of ``--jobs 2``). The figures go to a section of BENCHMARKS.md, one
per number of records (a run replaces the section of its own size).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["pipeline_figures", "pipeline_markdown", "pipeline_table", "section_title", "write_section"]

_FILES_PER_FOLDER = 1000


def section_title(records: int) -> str:
    """The title of the section of a run of ``records`` (a run replaces its own only)."""
    return f"## The main job at pipeline scale: {records:,} records (scripts/bench --pipeline)"


def _end(records: int) -> str:
    return f"<!-- end of the pipeline section, {records} records -->"


def _verifies(count: int) -> float:
    """Seconds for ``count`` ECDSA P-256 verifications in this process."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    signature, public = key.sign(b"x", ec.ECDSA(hashes.SHA256())), key.public_key()
    started = time.perf_counter()
    for _ in range(count):
        public.verify(signature, b"x", ec.ECDSA(hashes.SHA256()))
    return time.perf_counter() - started


def core_ceiling(count: int = 20000, tries: int = 3) -> float:
    """How many times more verifications two processes do than one, at once, here (the
    best of ``tries``: other load only lowers it)."""
    best = 0.0
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_verifies, [10, 10]))  # started
        for _ in range(tries):
            one = count / _verifies(count)
            started = time.perf_counter()
            list(pool.map(_verifies, [count, count]))
            best = max(best, 2 * count / (time.perf_counter() - started) / one)
    return round(best, 2)


def _step(argv: list[str], cwd: Path, records: int) -> dict[str, Any]:
    """Run ``python -m p11guard ARGV``: wall time, rate, peak RSS, children started."""
    import psutil

    out_path, err_path = cwd / "step.out", cwd / "step.err"
    started = time.perf_counter()
    with out_path.open("wb") as out_fh, err_path.open("wb") as err_fh:
        proc = subprocess.Popen([sys.executable, "-m", "p11guard", *argv], cwd=cwd, stdout=out_fh, stderr=err_fh)
    top, tree_peak, children = psutil.Process(proc.pid), 0, set()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            kids = top.children(recursive=True)
            children |= {k.pid for k in kids}
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in [top, *kids]))
        except psutil.Error:
            pass  # a process ended while we looked
        time.sleep(0.2)  # sampling period
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = out_path.read_text(), err_path.read_text()
    return {
        "exit": proc.returncode,
        "wall_s": round(wall, 2),
        "rate_per_s": round(records / wall),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "tree_rss_mib": round(tree_peak / 2**20, 1),
        "children": len(children),
        "summary": out.strip().splitlines()[:2],
        "error": err.strip().splitlines()[-1:] if proc.returncode else [],
    }


def _write_lines(path: Path, count: int) -> None:
    with path.open("w", buffering=1 << 20) as fh:
        for i in range(1, count + 1):
            fh.write(f"record number {i}\n")


def _write_tree(root: Path, count: int) -> None:
    for i in range(count):
        folder = root / f"part-{i // _FILES_PER_FOLDER:05d}"
        if i % _FILES_PER_FOLDER == 0:
            folder.mkdir(parents=True)
        (folder / f"record-{i:08d}.txt").write_bytes(b"record number %d\n" % i)


def _steps(source: Path, out: Path, pub: Path, config: Path, cwd: Path, records: int, one_job: bool) -> dict[str, Any]:
    sign = ["sign", "--config", str(config), "--key", "bench-ec", "--in", str(source), "--out", str(out), "--quiet"]
    verify = ["verify", "--in", str(source), "--sigs", str(out), "--pubkey", str(pub)]
    steps = {"sign": _step(sign, cwd, records)}
    if one_job:
        steps["verify --jobs 1"] = _step([*verify, "--jobs", "1"], cwd, records)
    steps[f"verify --jobs {os.cpu_count()}"] = _step(verify, cwd, records)
    steps["sign again (all done)"] = _step(sign, cwd, records)
    return steps


def pipeline_figures(records: int, dir_records: int, say: Any, one_job: bool = True) -> dict[str, Any]:
    """Every step for ``records`` lines and ``dir_records`` files (none: no directory
    steps; see the module); ``one_job``: measure ``verify --jobs 1`` as well."""
    from bench._bench import _setup_keys
    from p11guard.testbed import Testbed

    say("pipeline: how much faster 2 processes verify than 1 on this machine")
    ceiling = core_ceiling(20000 if records >= 100_000 else 2000, 3 if records >= 100_000 else 1)
    with tempfile.TemporaryDirectory(prefix="p11guard-pipeline-") as tmp:
        work = Path(tmp)
        bed = Testbed(work / "testbed")
        bed.up()
        try:
            _setup_keys(bed)
            pub = work / "pub.pem"
            config = bed.direct_config_path
            assert (
                _step(["pubkey", "--config", str(config), "--key", "bench-ec", "--out", str(pub)], work, 1)["exit"] == 0
            )
            say(f"pipeline: {records:,} line records")
            _write_lines(work / "records.txt", records)
            lines = _steps(work / "records.txt", work / "lines.jsonl", pub, config, work, records, one_job)
            (work / "lines.jsonl").unlink()
            tree: dict[str, Any] = {}
            if dir_records:
                say(f"pipeline: {dir_records:,} files in folders of {_FILES_PER_FOLDER}")
                _write_tree(work / "tree", dir_records)
                tree = _steps(work / "tree", work / "tree.jsonl", pub, config, work, dir_records, False)
        finally:
            bed.down()
    return {
        "records": records,
        "dir_records": dir_records,
        "cpus": os.cpu_count(),
        "core_ceiling": ceiling,
        "lines": lines,
        "directory": tree,
    }


def _rows(data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(f"{data['records']:,} lines", name, step) for name, step in data["lines"].items()] + [
        (f"{data['dir_records']:,} files", name, step) for name, step in data["directory"].items()
    ]


def _speedup(data: dict[str, Any]) -> float | None:
    steps = data["lines"]
    one, many = steps.get("verify --jobs 1"), steps.get(f"verify --jobs {data['cpus']}")
    return round(one["wall_s"] / many["wall_s"], 2) if one and many and data["cpus"] > 1 else None


def pipeline_table(data: dict[str, Any]) -> str:
    lines = [f"{'input':<16} {'step':<24} {'exit':>4} {'wall s':>8} {'per s':>9} {'peak MiB':>9} {'tree MiB':>9}"]
    for what, name, s in _rows(data):
        lines.append(
            f"{what:<16} {name:<24} {s['exit']:>4} {s['wall_s']:>8} {s['rate_per_s']:>9,} "
            f"{s['peak_rss_mib']:>9} {s['tree_rss_mib']:>9}" + (f"  ERROR {s['error']}" if s["error"] else "")
        )
    lines.append(
        f"verify on {data['cpus']} cores: {_speedup(data) or '-'}x --jobs 1 (machine ceiling {data['core_ceiling']}x)"
    )
    return "\n".join(lines)


def pipeline_markdown(data: dict[str, Any]) -> str:
    md = [
        section_title(data["records"]),
        "",
        f"{data['cpus']} cores; SoftHSM2 in-process, ECDSA P-256, `workers` = cores; each step its own "
        "`python -m p11guard` process. Peak RSS: the largest process of the step (`ru_maxrss`); tree: "
        "the step and every process it started, summed (sampled every 0.2 s). Children: processes the "
        f"step started (hosts, verify's pool). Files: {_FILES_PER_FOLDER} per folder.",
        "",
        "| input | step | wall s | records/s | peak RSS MiB | tree RSS MiB | children |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for what, name, s in _rows(data):
        md.append(
            f"| {what} | `{name}` | {s['wall_s']} | {s['rate_per_s']:,} | {s['peak_rss_mib']} | "
            f"{s['tree_rss_mib']} | {s['children']} |"
        )
    speedup = f"**{_speedup(data)}x** `--jobs 1`" if _speedup(data) else "`--jobs 1` not measured"
    md += [
        "",
        f"`verify` on {data['cpus']} cores: {speedup}; on this machine at the start of the run two processes "
        f"verifying ECDSA at once did {data['core_ceiling']}x what one did (the ceiling, best of 3).",
        "",
        _end(data["records"]),
    ]
    return "\n".join(md)


def write_section(path: Path, section: str, records: int) -> None:
    """Put the section into ``path`` (BENCHMARKS.md), replacing the one of a run of as
    many records."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(section_title(records)) + r".*?" + re.escape(_end(records)), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
