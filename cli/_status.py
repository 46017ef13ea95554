"""``p11guard status``: start a one-off guard, show the group like ``LunaHAStatus``.

Exit 0 when the group serves, 1 when it does not (failed to start, or serving nothing),
2 for a usage or configuration error (raised, one line).
"""

from __future__ import annotations

import json
import time
from typing import Any

from p11guard.base import Config, ConfigError, P11GuardError
from p11guard.cli._paths import UsageError

__all__ = ["format_status", "run_status"]

EXIT_OK, EXIT_FAILED = 0, 1


def _when(at: float | None) -> str:
    return "-" if not at else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _probe(probe: dict[str, Any] | None) -> str:
    if not probe:
        return "-"
    head = f"ok {probe['latency_s'] * 1000:.1f} ms" if probe["ok"] else "FAILED"
    return f"{head} at {_when(probe['at'])}"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def format_status(config: Config, health: dict[str, Any], status: dict[str, Any] | None) -> str:
    """The human table: group line, members, workers, outages, counters."""
    serving = "" if health["serving"] else " (not serving)"
    lines = [f'HA group "{config.token_label}": {health["state"]}{serving}']
    if health.get("reason"):
        lines.append(f"  reason: {health['reason']}")
    if status is None:
        return "\n".join(lines)
    lines[0] += (
        f", generation {status['generation']}, policy {status['policy']}, "
        f"{health['members_serving']} of {health['members_total']} members serving, since {_when(health['since'])}"
    )
    rows = [["member", "state", "gen", "serial", "token", "last probe", "losses", "recoveries", "outages"]]
    reasons = []
    for m in status["members"]:
        probe = m.get("last_probe") or {}
        rows.append(
            [
                m["name"],
                m["state"],
                str(m["generation"]),
                probe.get("serial") or "-",
                probe.get("token_label") or "-",
                _probe(m.get("last_probe")),
                str(m["losses"]),
                str(m["recoveries"]),
                str(len(m["outages"])),
            ]
        )
        if m.get("reason"):
            reasons.append(f"  {m['name']}: {m['reason']}")
    lines += ["", *_table(rows), *reasons]
    workers = [["worker", "member", "pid", "status", "ops", "errors", "restarts"]]
    for w in status["workers"]:
        pid = str(w["pid"]) if w["pid"] else "-"
        workers.append(
            [str(w["id"]), w["member"], pid, w["status"], str(w["ops"]), str(w["errors"]), str(w["restarts"])]
        )
    lines += ["", *_table(workers)]
    outages = status["outages"]
    lines.append("")
    lines.append(f"outages: {len(outages) or 'none'}")
    for o in outages[-5:]:
        took = f"{o['duration_s']:.3f} s" if o["duration_s"] is not None else "in progress"
        lines.append(f"  {_when(o['start'])}  {took}  generation {o['generation']}: {o['cause']}")
    counters = ", ".join(f"{k} {v}" for k, v in status["counters"].items())
    lines.append(f"counters: {counters}")
    lines.append(f"queued {status['queued']}, in flight {status['in_flight']}")
    return "\n".join(lines)


def _settled(status: dict[str, Any]) -> bool:
    """Every member probed and its workers up or given up (not just the first one)."""
    return not any(m["state"] in ("starting", "recovering") for m in status["members"]) and not any(
        w["status"] == "starting" for w in status["workers"]
    )


def run_status(config: Config, as_json: bool) -> int:
    """Start a guard of one worker (per member), wait until every member has answered its
    probe or not, report, close it. Returns the exit code."""
    from p11guard._guard import Guard

    config = config.replace(workers=1)
    status: dict[str, Any] | None = None
    try:
        with Guard(config) as guard:
            end = time.monotonic() + config.probe_s * 2 + 10
            while not _settled(guard.status()) and time.monotonic() < end:
                time.sleep(0.05)
            health, status = guard.health(), guard.status()
    except (ConfigError, UsageError):
        raise
    except P11GuardError as exc:  # it could not start: that is the answer, not a usage error
        health = {"serving": False, "state": "FAILED", "reason": str(exc), "since": time.time()}
    if as_json:
        print(json.dumps({"serving": health["serving"], "health": health, "status": status}, indent=2))
    else:
        print(format_status(config, health, status))
    return EXIT_OK if health["serving"] else EXIT_FAILED
