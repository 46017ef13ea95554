"""The config a Dask job ships to its workers: a path or a dict, never a PIN.

The client checks everything it can for the workers' machines (every field, type, range
and name: :meth:`Config.validate` with ``local=False``) and that every path in it is
absolute (a worker resolves nothing against the client's working directory). What only a
worker's machine can tell -- the module file exists there, the PIN file or variable is
readable there -- each worker checks when its guard starts.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from p11guard.base import Config, ConfigError

__all__ = ["ConfigSource", "client_config", "worker_config"]

#: What a plugin carries: an absolute config path, or a parsed config (the TOML structure).
ConfigSource = str | dict[str, Any]


def _absolute(value: Any, name: str) -> None:
    if isinstance(value, str) and not os.path.isabs(value):
        raise ConfigError(f"{value!r} must be an absolute path: each Dask worker reads it on its own machine", name)


def client_config(config: str | os.PathLike[str] | Mapping[str, Any] | Config) -> tuple[ConfigSource, Config]:
    """Check ``config`` for the workers; return what the plugin carries and the config.

    A :class:`Config` is taken by the file it came from (``Config.source``); one built in
    code has none: pass its dict instead.

    Raises:
        ConfigError: naming the field (unreadable file, bad TOML, invalid or relative field).
    """
    if isinstance(config, Config):
        if config.source is None:
            raise ConfigError(
                "a Config built in code cannot be sent to Dask workers: pass the config file's path or its dict"
            )
        config = config.source
    if isinstance(config, Mapping):
        data: dict[str, Any] = copy.deepcopy(dict(config))
        module = data.get("module")
        group = data.get("group")
        if isinstance(module, Mapping):
            _absolute(module.get("path"), "module.path")
        if isinstance(group, Mapping):
            _absolute(group.get("pin_file"), "group.pin_file")
            for i, member in enumerate(group.get("members") or []):
                if isinstance(member, Mapping):
                    _absolute(member.get("path"), f"group.members[{i}].path")
        return data, Config.from_dict(data, local=False)
    path = str(Path(config).resolve())
    return path, Config.from_file(path, local=False)


def worker_config(source: ConfigSource) -> Config:
    """The config on a worker's machine, checked there (module files included)."""
    if isinstance(source, dict):
        return Config.from_dict(copy.deepcopy(source))
    return Config.from_file(source)
