"""The simulated network HSM group: SoftHSM2 behind ``p11-kit server`` behind a fault proxy."""

from p11guard.testbed._testbed import FAULTS, Testbed, TestbedError, find_tools

__all__ = ["FAULTS", "Testbed", "TestbedError", "find_tools"]
