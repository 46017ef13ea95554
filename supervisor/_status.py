"""The status snapshot (``Guard.status()``): what ``LunaHAStatus`` shows, and more."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from p11guard.host import HostProcess
from p11guard.supervisor._states import Counters, Member, Outage, State, WorkerSlot

__all__ = ["outages_view", "snapshot"]


def outages_view(outages: Iterable[Outage]) -> list[dict[str, Any]]:
    return [
        {
            "start": o.start,
            "end": o.end,
            "duration_s": o.duration_s,
            "recover_s": o.recover_s,
            "cause": o.cause,
            "generation": o.generation,
        }
        for o in outages
    ]


def _with_current(done: Iterable[Outage], current: Outage | None) -> list[Outage]:
    return [*done, *([current] if current else [])]


def snapshot(
    *,
    state: State,
    generation: int,
    policy: str,
    members: Iterable[Member],
    slots: Iterable[WorkerSlot],
    worker_host: Callable[[int], HostProcess | None],
    last_probe: dict[str, Any] | None,
    outages: Iterable[Outage],
    outage: Outage | None,
    counters: Counters,
    queued: int,
    in_flight: int,
    failed_reason: str | None,
    keys: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The whole picture as plain data (JSON-serialisable)."""
    slots = sorted(slots, key=lambda s: s.wid)
    workers = []
    for slot in slots:
        host = worker_host(slot.wid)
        workers.append(
            {
                "id": slot.wid,
                "member": slot.member,
                "pid": slot.pid,
                "alive": bool(host and host.alive and host.pid == slot.pid),
                "status": str(slot.status),
                "generation": slot.generation,
                "ops": slot.ops,
                "errors": slot.errors,
                "last_error": slot.last_error,
                "sessions_opened": slot.sessions_opened,
                "restarts": slot.restarts,
            }
        )
    return {
        "state": str(state),
        "generation": generation,
        "policy": policy,
        "members": [
            {
                "name": m.name,
                "state": str(m.state),
                "generation": m.generation,
                "reason": m.reason,
                "workers": sorted(s.wid for s in slots if s.member == m.name),
                "losses": m.losses,
                "recoveries": m.recoveries,
                "last_probe": m.last_probe,
                "token": m.identity,
                "mechanisms": m.mechanisms,
                "outages": outages_view(_with_current(m.outages, m.outage)),
            }
            for m in members
        ],
        "workers": workers,
        "last_probe": last_probe,
        "outages": outages_view(_with_current(outages, outage)),
        "counters": {
            "ops_ok": counters.ops_ok,
            "ops_failed": counters.ops_failed,
            "ops_retried": counters.ops_retried,
            "outcome_unknown": counters.outcome_unknown,
            "recoveries": counters.recoveries,
            "member_losses": counters.member_losses,
            "member_recoveries": counters.member_recoveries,
            "coalesced": counters.coalesced,
            "direct": counters.direct,
            "probes": counters.probes,
            "probes_failed": counters.probes_failed,
            "login_failures": counters.login_failures,
            "host_restarts": counters.host_restarts,
        },
        "queued": queued,
        "in_flight": in_flight,
        "failed_reason": failed_reason,
        "keys": keys or {},
    }
