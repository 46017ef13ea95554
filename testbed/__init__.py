"""The simulated HSM groups: SoftHSM2 behind ``p11-kit server``(s) behind fault proxies (a
network group), or one device in-process (a software TPM, opencryptoki's soft token)."""

from p11guard.testbed._devices import BACKENDS, DEVICE_FAULTS
from p11guard.testbed._testbed import FAULTS, MAX_MEMBERS, Testbed, TestbedError, find_tools, member_names

__all__ = [
    "BACKENDS",
    "DEVICE_FAULTS",
    "FAULTS",
    "MAX_MEMBERS",
    "Testbed",
    "TestbedError",
    "find_tools",
    "member_names",
]
