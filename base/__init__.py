"""The leaf base of p11guard: errors, the PIN wrapper, the configuration, a poll helper.

Every layer (facade, supervisor, actors, host, protocol, testbed, CLI) may import this
package; it imports **nothing of ours** -- only the standard library (``tomllib`` among
it). That rule keeps it at the bottom of the import graph; ``tests/test_layers.py``
checks it.
"""

from p11guard.base._config import DEFAULT_MEMBER, Config, Member
from p11guard.base._config_checks import file_kind
from p11guard.base._errors import (
    AuthError,
    ChannelPoisoned,
    ConfigError,
    GroupLossError,
    GuardClosed,
    GuardFailed,
    GuardForked,
    HostCrashed,
    HostError,
    HostStartError,
    HostTimeout,
    InternalError,
    KeyChanged,
    LabelAmbiguous,
    LabelTaken,
    MechanismUnsupported,
    ModuleLoadError,
    OpTimeout,
    OutcomeUnknown,
    OutOfService,
    P11GuardError,
    RemoteError,
    RequestError,
    SessionError,
    StaleGeneration,
    TokenMismatch,
    UserError,
    remote_error,
)
from p11guard.base._lazy import lazy_exports
from p11guard.base._poll import poll_until
from p11guard.base._secret import Secret

__all__ = [
    "DEFAULT_MEMBER",
    "AuthError",
    "ChannelPoisoned",
    "Config",
    "ConfigError",
    "GroupLossError",
    "GuardClosed",
    "GuardFailed",
    "GuardForked",
    "HostCrashed",
    "HostError",
    "HostStartError",
    "HostTimeout",
    "InternalError",
    "KeyChanged",
    "LabelAmbiguous",
    "LabelTaken",
    "MechanismUnsupported",
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
    "TokenMismatch",
    "UserError",
    "file_kind",
    "lazy_exports",
    "poll_until",
    "remote_error",
]
