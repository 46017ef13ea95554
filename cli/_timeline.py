"""A picture of a run: signatures per second, with the group's and members' states as bands.

:class:`Timeline` records during ``p11guard sign`` (state changes through
``Guard.on_state_change``, members sampled from ``status()``, signatures as they are
written); :func:`render` draws the PNG with matplotlib, which is optional:
:func:`require_matplotlib` says how to get it before any work starts.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p11guard.cli._paths import UsageError

if TYPE_CHECKING:
    from p11guard._guard import Guard

__all__ = ["COLORS", "Timeline", "render", "require_matplotlib"]

#: Band colours by state (group states upper case, member states lower case).
COLORS = {
    "SERVING": "#4caf50",
    "serving": "#4caf50",
    "STARTING": "#90a4ae",
    "starting": "#90a4ae",
    "SUSPECT": "#ffc107",
    "suspect": "#ffc107",
    "LOST": "#e53935",
    "lost": "#e53935",
    "RECOVERING": "#fb8c00",
    "recovering": "#fb8c00",
    "FAILED": "#6d4c41",
    "out": "#6d4c41",
    "CLOSED": "#bdbdbd",
}


def require_matplotlib(flag: str = "--timeline") -> None:
    """Raise :class:`UsageError` (exit 2, before any work) if matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{flag} draws with matplotlib, which is not installed: pip install matplotlib")


class Timeline:
    """Signatures per second and state changes of one run, from ``guard``'s start."""

    SAMPLE_S = 0.1

    def __init__(self, guard: Guard) -> None:
        self.start = time.time()
        self.end: float | None = None
        self.counts: list[int] = []
        self.states: list[tuple[float, str]] = [(self.start, guard.state)]
        self.members: dict[str, list[tuple[float, str]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sample(guard)
        guard.on_state_change(self._on_change)
        self._sampler = threading.Thread(target=self._run, args=(guard,), name="p11guard-timeline", daemon=True)
        self._sampler.start()

    def _on_change(self, old: str, new: str, info: dict[str, Any]) -> None:
        with self._lock:
            self.states.append((time.time(), new))

    def signed(self, count: int) -> None:
        """``count`` signatures were just written."""
        second = int(time.time() - self.start)
        if len(self.counts) <= second:
            self.counts.extend([0] * (second + 1 - len(self.counts)))
        self.counts[second] += count

    def _run(self, guard: Guard) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            self._sample(guard)

    def _sample(self, guard: Guard) -> None:
        """Note each member's state (``status()``: one actor ask)."""
        now = time.time()
        try:
            members = guard.status().get("members", [])
        except Exception:  # closing: nothing more to see
            return
        for m in members:
            seen = self.members.setdefault(m["name"], [])
            if not seen or seen[-1][1] != m["state"]:
                seen.append((now, m["state"]))

    def finish(self) -> dict[str, Any]:
        """Stop recording; the data as plain JSON (times in seconds since the start)."""
        self._stop.set()
        self._sampler.join(5)
        self.end = time.time()
        self.signed(0)
        with self._lock:
            states = list(self.states)

        def rel(changes: list[tuple[float, str]]) -> list[list[Any]]:
            return [[round(t - self.start, 3), s] for t, s in changes]

        return {
            "start": self.start,
            "duration_s": round(self.end - self.start, 3),
            "signatures_per_s": list(self.counts),
            "states": rel(states),
            "members": {name: rel(changes) for name, changes in self.members.items()},
        }


def _segments(changes: list[list[Any]], end: float) -> list[tuple[float, float, str]]:
    out = []
    for i, (t, state) in enumerate(changes):
        t_next = changes[i + 1][0] if i + 1 < len(changes) else end
        if t_next > t:
            out.append((float(t), float(t_next) - float(t), str(state)))
    return out


def render(data: dict[str, Any], path: Path, title: str) -> None:
    """Draw ``data`` (from :meth:`Timeline.finish`) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    end = float(data["duration_s"])
    rows = [("group", data["states"]), *((f"member {n}", c) for n, c in data["members"].items())]
    fig, (ax, bands) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=(10, 3.2 + 0.35 * len(rows)),
        gridspec_kw={"height_ratios": [4, 0.5 + 0.4 * len(rows)]},
    )
    counts = data["signatures_per_s"]
    ax.bar([i + 0.5 for i in range(len(counts))], counts, width=0.9, color="#3b6ea8", label="signatures / s", zorder=2)
    seen: dict[str, None] = {}
    for t, width, state in _segments(data["states"], end):
        seen[state] = None
        if state != "SERVING":
            ax.axvspan(t, t + width, color=COLORS.get(state, "#9e9e9e"), alpha=0.25, lw=0, zorder=1)
    for row, (_, changes) in enumerate(rows):
        for t, width, state in _segments(changes, end):
            seen[state.upper()] = None
            bands.broken_barh([(t, width)], (row - 0.4, 0.8), color=COLORS.get(state, "#9e9e9e"))
    bands.set_yticks(range(len(rows)), [name for name, _ in rows])
    bands.set_ylim(len(rows) - 0.5, -0.5)
    bands.set_xlabel("seconds since signing began")
    ax.set_ylabel("signatures / s")
    ax.set_xlim(0, max(end, 1.0))
    ax.set_title(title)
    handles = [Patch(color=COLORS.get(s, "#9e9e9e"), label=s) for s in seen]
    ax.legend(
        handles=[*ax.get_legend_handles_labels()[0], *handles],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
