"""The soak's memory record: RSS samples of the guard's process and hosts, and the verdict."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from p11guard._guard import Guard

__all__ = ["maybe_sample", "not_zombie", "rss_sample", "soak_verdict"]


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


def soak_verdict(rss: list[dict[str, Any]], workdir: Path, say: Any) -> list[str]:
    """Memory must not keep growing: compare the last third with the middle third."""
    out: list[str] = []
    if len(rss) < 9:
        return out
    third = len(rss) // 3
    mid = statistics.median(s["supervisor_mib"] for s in rss[third : 2 * third])
    last = statistics.median(s["supervisor_mib"] for s in rss[2 * third :])
    if last > mid * 1.10 + 2:
        out.append(f"supervisor RSS keeps growing: {mid:.1f} -> {last:.1f} MiB")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 5))
        ax.plot([s["t"] for s in rss], [s["supervisor_mib"] for s in rss], label="supervisor")
        for name in sorted({k for s in rss for k in s if k.startswith(("worker", "probe"))}):
            pts = [(s["t"], s[name]) for s in rss if name in s]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=0.8)
        ax.set_xlabel("s")
        ax.set_ylabel("RSS MiB")
        ax.legend()
        path = Path("chaos-soak-rss.png").resolve()
        fig.savefig(path, dpi=80)
        say(f"RSS plot: {path}")
    except ImportError:
        say("matplotlib not installed: no RSS plot")
    return out
