"""p11guard: keep PKCS#11 crypto work alive through the loss of a whole HSM group.

Quick start::

    from p11guard import Config, Guard

    with Guard(Config.from_file("p11guard.toml")) as g:
        signature = g.sign("my-key", b"data")
"""

from p11guard._config import Config, Member
from p11guard._errors import (
    AuthError,
    ChannelPoisoned,
    ConfigError,
    GroupLossError,
    GuardClosed,
    GuardFailed,
    HostCrashed,
    HostError,
    HostStartError,
    HostTimeout,
    InternalError,
    ModuleLoadError,
    OpTimeout,
    OutcomeUnknown,
    OutOfService,
    P11GuardError,
    RemoteError,
    RequestError,
    SessionError,
    StaleGeneration,
    UserError,
)
from p11guard._guard import Guard
from p11guard._secret import Secret

__all__ = [
    "AuthError",
    "ChannelPoisoned",
    "Config",
    "ConfigError",
    "GroupLossError",
    "Guard",
    "GuardClosed",
    "GuardFailed",
    "HostCrashed",
    "HostError",
    "HostStartError",
    "HostTimeout",
    "InternalError",
    "Member",
    "ModuleLoadError",
    "OpTimeout",
    "OutOfService",
    "OutcomeUnknown",
    "P11GuardError",
    "RemoteError",
    "RequestError",
    "Secret",
    "SessionError",
    "StaleGeneration",
    "UserError",
]
__version__ = "0.1.0"

import logging as _logging

# A library logs; the application decides where it goes (the CLI shows it with -v).
_logging.getLogger("p11guard").addHandler(_logging.NullHandler())
