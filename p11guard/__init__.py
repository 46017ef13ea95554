"""p11guard: keep PKCS#11 crypto work alive through the loss of a whole HSM group.

Quick start::

    from p11guard import Config, Guard

    with Guard(Config.from_file("p11guard.toml")) as g:
        signature = g.sign("my-key", b"data")

This package is the facade: :class:`Guard` and the public names. They are imported on
first use, so ``import p11guard`` (and every host process, which imports this package on
its way to :mod:`p11guard.host`) loads nothing it does not use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p11guard._guard import Guard
    from p11guard.base import (
        AuthError,
        ChannelPoisoned,
        Config,
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
        Member,
        ModuleLoadError,
        OpTimeout,
        OutcomeUnknown,
        OutOfService,
        P11GuardError,
        RemoteError,
        RequestError,
        Secret,
        SessionError,
        StaleGeneration,
        TokenMismatch,
        UserError,
    )

__all__ = [
    "AuthError",
    "ChannelPoisoned",
    "Config",
    "ConfigError",
    "GroupLossError",
    "Guard",
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
]
__version__ = "0.1.0"

_HOMES = {"Guard": "p11guard._guard", **{name: "p11guard.base" for name in __all__ if name != "Guard"}}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
