"""The simulated network HSM group: SoftHSM2 behind ``p11-kit server``(s) behind fault proxies."""

from p11guard.testbed._testbed import FAULTS, MAX_MEMBERS, Testbed, TestbedError, find_tools, member_names

__all__ = ["FAULTS", "MAX_MEMBERS", "Testbed", "TestbedError", "find_tools", "member_names"]
