"""Error kinds on the wire: what a host says about an error, as the parent acts on it."""

from __future__ import annotations

__all__ = ["ERROR_KINDS", "LOSS_KINDS"]

#: Every kind an error reply may carry.
ERROR_KINDS = frozenset(
    {"group_loss", "session", "auth", "user", "bad_request", "stale_generation", "internal", "config"}
)

#: Error kinds that are loss signals: the worker is suspect and the group must be probed.
LOSS_KINDS = frozenset({"group_loss", "session"})
