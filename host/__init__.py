"""Host processes: one PKCS#11 module instance and one session per child process."""

from p11guard.host._process import ENV_PASSTHROUGH, HostProcess

__all__ = ["ENV_PASSTHROUGH", "HostProcess"]
