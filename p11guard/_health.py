"""``Guard.health()``: serving or not, why, since when -- read without asking the actor."""

from __future__ import annotations

from typing import Any

from p11guard.supervisor import SharedState, State

__all__ = ["health_view"]


def _reason(shared: SharedState) -> str | None:
    state = shared.state
    if state == State.SERVING:
        return None
    if state == State.STARTING:
        return "starting: the first workers are not up yet"
    if state == State.SUSPECT:
        return f"no member serves; probing ({shared.cause})" if shared.cause else "no member serves; probing"
    if state in (State.LOST, State.RECOVERING):
        cause = shared.outage_cause or shared.cause
        what = "group lost" if state == State.LOST else "group lost, recovering"
        return f"{what}: {cause}" if cause else what
    if state == State.FAILED:
        return shared.failed_reason or "failed"
    return "the guard is closed"


def health_view(shared: SharedState) -> dict[str, Any]:
    """The health dict (see :meth:`p11guard.Guard.health`)."""
    return {
        "serving": shared.state == State.SERVING,
        "state": str(shared.state),
        "reason": _reason(shared),
        "since": shared.since,
        "generation": shared.generation,
        "members_serving": shared.members_serving,
        "members_total": shared.members_total,
    }
