"""Error kinds on the wire: what a host says about an error, as the parent acts on it.

The parent never reads raw CKR codes to decide: the host classifies each code into a kind
(:mod:`p11guard.host._ckr`), and the kind says who the error belongs to.
"""

from __future__ import annotations

__all__ = ["ANSWER_KINDS", "ERROR_KINDS", "LOSS_KINDS", "SIGNAL_KINDS"]

#: Every kind an error reply may carry.
ERROR_KINDS = frozenset(
    {"group_loss", "session", "auth", "user", "bad_request", "stale_generation", "internal", "config"}
)

#: The caller's own errors: the request's answer (unknown key, bad argument, mechanism
#: mismatch, bad data, wrong PIN...). Reported as they are; never a sign of a loss.
ANSWER_KINDS = frozenset({"user", "bad_request", "auth", "config", "stale_generation"})

#: Loss *signals*: everything that is not clearly the caller's -- the classic loss codes
#: (``group_loss``, ``session``) and ``internal`` (CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED,
#: CKR_DEVICE_MEMORY... a TPM that is gone answers CKR_GENERAL_ERROR). A signal is
#: evidence to weigh, not a verdict: the worker is suspect, the probe decides.
SIGNAL_KINDS = ERROR_KINDS - ANSWER_KINDS

#: The classic loss codes: a probe that meets one needs no second try.
LOSS_KINDS = frozenset({"group_loss", "session"})
