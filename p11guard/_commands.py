"""The HSM commands of the CLI (keys, keygen, pubkey, sign, verify)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands"]


def add_commands(sub: Any) -> None:
    """Register the HSM commands on the CLI's sub-parser set."""
    _ = (sub, argparse)
