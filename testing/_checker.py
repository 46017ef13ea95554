"""The chaos run's invariants, checked as each operation ends: memory bounded by the
violations kept, not by the run's length (a soak can run for hours)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p11guard.cli._verify import verify_signature

__all__ = ["MAX_VIOLATIONS", "TOKEN_CHANGING", "Checker", "OpRecord"]

#: Operations that change the token: OutcomeUnknown is a documented answer for them.
TOKEN_CHANGING = frozenset({"generate_key_pair"})
#: Violations listed in full; the rest are counted.
MAX_VIOLATIONS = 50


@dataclass
class OpRecord:
    """One accepted operation and how it ended."""

    seq: int
    op: str
    outcome: str  # ok | error
    error: str | None = None
    completions: int = 1
    check: dict[str, Any] = field(default_factory=dict)  # what to verify


class Checker:
    """Per-operation invariants as records arrive; run-level ones at :meth:`finish`.

    Keeps counts, one bit per operation seen (a record twice is a violation), and the
    first :data:`MAX_VIOLATIONS` violations -- never the records.
    """

    def __init__(self, public_pem: bytes | None) -> None:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        self._pub = load_pem_public_key(public_pem) if public_pem else None
        self._seen = bytearray()
        self.ops = 0
        self.errors = 0
        self.outcome_unknown = 0
        self.violations: list[str] = []
        self.more_violations = 0

    def _violate(self, text: str) -> None:
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(text)
        else:
            self.more_violations += 1

    def _mark(self, seq: int) -> bool:
        """Record ``seq`` as seen; False if it was seen before."""
        byte, bit = divmod(seq, 8)
        if byte >= len(self._seen):
            self._seen.extend(bytes(byte + 1 - len(self._seen) + 4096))
        if self._seen[byte] & (1 << bit):
            return False
        self._seen[byte] |= 1 << bit
        return True

    def add(self, r: OpRecord) -> None:
        self.ops += 1
        if not self._mark(r.seq):
            self._violate("an operation was recorded twice")
        if r.completions != 1:
            self._violate(f"op {r.seq} ({r.op}) completed {r.completions} times")
        if r.outcome == "error":
            self.errors += 1
            unknown = (r.error or "").startswith("OutcomeUnknown")
            self.outcome_unknown += unknown
            if unknown and r.op not in TOKEN_CHANGING:
                self._violate(f"op {r.seq} ({r.op}): OutcomeUnknown for an idempotent op")
            elif not unknown:
                self._violate(f"op {r.seq} ({r.op}) failed: {r.error}")
            if "stale_generation" in (r.error or ""):
                self._violate(f"op {r.seq} used a stale generation")
            return
        if r.op == "sign":
            sig, data = bytes.fromhex(r.check["signature"]), bytes.fromhex(r.check["data"])
            if self._pub is None or not verify_signature(self._pub, "ecdsa-sha256", sig, data):
                self._violate(f"op {r.seq}: signature does not verify")
        elif r.op == "encrypt_decrypt" and r.check.get("plain") != r.check.get("decrypted"):
            self._violate(f"op {r.seq}: ciphertext did not decrypt to its plaintext")
        elif r.op in ("verify", "hmac") and r.check.get("valid") is not True:
            self._violate(f"op {r.seq}: a good signature ({r.op}) did not verify")

    def finish(self, status: dict[str, Any], leaked_pids: list[int], fd_growth: int, final_state: str) -> list[str]:
        """Every violation of the run, the run-level invariants included."""
        out = list(self.violations)
        if self.more_violations:
            out.append(f"... and {self.more_violations} more violations")
        counters = status.get("counters", {})
        if status.get("generation") != counters.get("recoveries"):
            out.append(f"generation {status.get('generation')} != recoveries {counters.get('recoveries')}")
        if leaked_pids:
            out.append(f"processes left behind: {leaked_pids}")
        if fd_growth > 8:
            out.append(f"file descriptors grew by {fd_growth}")
        if final_state != "SERVING":
            out.append(f"final state {final_state}, not SERVING")
        return out
