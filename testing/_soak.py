"""The soak's memory record: RSS samples of the guard's process and hosts, and the verdict."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from p11guard._guard import Guard

__all__ = ["TOLERANCE_MIB_PER_MIN", "growth", "maybe_sample", "not_zombie", "rss_sample", "soak_verdict"]


def not_zombie(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def maybe_sample(rss: list[dict[str, Any]], guard: Guard, start: float) -> None:
    """One RSS sample a second."""
    if not rss or time.monotonic() - start - rss[-1]["t"] >= 1.0:
        rss.append(rss_sample(guard, start))


def rss_sample(guard: Guard, start: float) -> dict[str, Any]:
    import psutil

    sample: dict[str, Any] = {
        "t": round(time.monotonic() - start, 2),
        "supervisor_mib": psutil.Process().memory_info().rss / 2**20,
    }
    for name, pid in guard.host_pids().items():
        try:
            sample[name] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            pass
    return sample


#: Steady growth allowed, MiB per minute (15 MiB an hour). Measured (5 min, seed 4242):
#: +0.17 MiB/min, decreasing -- the allocator's arenas filling (backoff timers and probe
#: threads come and go) and the fingerprint pins of the workload's ever-new key labels
#: (~150 bytes each: a guard pins every key it meets). The runner's own record is bounded.
TOLERANCE_MIB_PER_MIN = 0.25


def growth(rss: list[dict[str, Any]], key: str = "supervisor_mib") -> float:
    """The least-squares slope of ``key`` over time, MiB per minute, after the first fifth
    of the run (start-up fills caches and allocator arenas once)."""
    samples = rss[len(rss) // 5 :]
    ts, ys = [s["t"] / 60 for s in samples], [s[key] for s in samples]
    mean_t, mean_y = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mean_t) ** 2 for t in ts)
    return sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


def soak_verdict(rss: list[dict[str, Any]], workdir: Path, say: Any) -> tuple[list[str], dict[str, Any]]:
    """Memory must not keep growing: the slope of the process's RSS (the guard's and the
    runner's, whose own record is bounded) within :data:`TOLERANCE_MIB_PER_MIN`."""
    out: list[str] = []
    if len(rss) < 10:
        return out, {}
    slope = growth(rss)
    report = {
        "samples": len(rss),
        "rss_first_mib": round(rss[0]["supervisor_mib"], 1),
        "rss_last_mib": round(rss[-1]["supervisor_mib"], 1),
        "slope_mib_per_min": round(slope, 4),
        "tolerance_mib_per_min": TOLERANCE_MIB_PER_MIN,
        "host_slopes_mib_per_min": {
            name: round(growth(rss, name), 4)
            for name in sorted({k for s in rss[len(rss) // 5 :] for k in s if k.startswith(("worker", "probe"))})
            if all(name in s for s in rss[len(rss) // 5 :])
        },
    }
    say(f"soak: RSS slope {slope:+.4f} MiB/min (tolerance {TOLERANCE_MIB_PER_MIN}), {report}")
    if slope > TOLERANCE_MIB_PER_MIN:
        out.append(f"process RSS keeps growing: {slope:+.3f} MiB/min over the run (tolerance {TOLERANCE_MIB_PER_MIN})")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 5))
        ax.plot([s["t"] for s in rss], [s["supervisor_mib"] for s in rss], label="the guard's process")
        for name in sorted({k for s in rss for k in s if k.startswith(("worker", "probe"))}):
            pts = [(s["t"], s[name]) for s in rss if s.get(name)]  # 0: a host being replaced
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=0.8)
        ax.set_xlabel("s")
        ax.set_ylabel("RSS MiB")
        ax.legend()
        path = Path("chaos-soak-rss.png").resolve()
        fig.savefig(path, dpi=80)
        say(f"RSS plot: {path}")
    except ImportError:
        say("matplotlib not installed: no RSS plot")
    return out, report
