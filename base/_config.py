"""Configuration: a TOML file, validated at load; every error names its field."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from p11guard.base._config_checks import (
    check_env,
    check_seconds,
    check_serials,
    read_pin_file,
    type_name,
)
from p11guard.base._errors import ConfigError
from p11guard.base._secret import Secret

__all__ = ["DEFAULT_MEMBER", "Config", "Member"]

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "module": {"path": str, "env": dict},
    "group": {"token_label": str, "pin_file": str, "pin_env": str, "members": list, "serials": list},
    "workers": {"count": int, "batch_size": int},
    "timeouts": {
        "call_s": (int, float),
        "probe_s": (int, float),
        "probe_interval_s": (int, float),
        "start_s": (int, float),
    },
    "recovery": {
        "backoff_initial_s": (int, float),
        "backoff_max_s": (int, float),
        "give_up_after_s": (int, float),
    },
    "admission": {"policy": str, "queue_max": int, "op_deadline_s": (int, float)},
    "testing": {"fault_injection": bool},
}

_MEMBER_SCHEMA: dict[str, type] = {"name": str, "env": dict, "path": str, "token_label": str}
_MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: The name of the one implicit member of a group that lists none.
DEFAULT_MEMBER = "default"


@dataclass(frozen=True)
class Member:
    """One member of an HA group: its own server (``env``), and optionally its own module
    (``path``) and ``token_label``. What it leaves out comes from ``[module]``/``[group]``."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    token_label: str | None = None

    def __repr__(self) -> str:
        return f"Member({self.name!r})"


@dataclass(frozen=True)
class Config:
    """Everything p11guard needs to know; safe defaults for all but module and group.

    Build with :meth:`from_file` or :meth:`from_dict` (both validate), or directly and then
    call :meth:`validate`.
    """

    module_path: str
    token_label: str
    pin_file: str | None = None
    pin_env: str | None = None
    module_env: dict[str, str] = field(default_factory=dict)
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    batch_size: int = 64
    call_s: float = 20.0
    probe_s: float = 5.0
    probe_interval_s: float = 5.0
    start_s: float = 30.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    policy: str = "queue"
    queue_max: int = 10000
    op_deadline_s: float = 300.0
    fault_injection: bool = False
    members: tuple[Member, ...] = ()
    give_up_after_s: float | None = None
    serials: tuple[str, ...] = ()
    source: str | None = None

    def __repr__(self) -> str:
        # No secret is held here (only where to find the PIN), but keep it short.
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name not in ("module_env", "source")
        )
        return f"Config({shown})"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], local: bool = True) -> Config:
        """Read and validate a TOML config file (``local``: as :meth:`validate`).

        Raises:
            ConfigError: unreadable file, bad TOML, unknown or invalid field.
        """
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror or exc}") from exc
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, base_dir=p.resolve().parent, source=str(p), local=local)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], base_dir: Path | None = None, source: str | None = None, local: bool = True
    ) -> Config:
        """Validate a parsed config (the TOML structure) and build a :class:`Config`
        (``local``: as :meth:`validate`)."""
        for section, values in data.items():
            if section not in _SCHEMA:
                raise ConfigError(f"unknown section (known: {', '.join(_SCHEMA)})", section)
            if not isinstance(values, dict):
                raise ConfigError("must be a table", section)
            for key, value in values.items():
                name = f"{section}.{key}"
                want = _SCHEMA[section].get(key)
                if want is None:
                    raise ConfigError(f"unknown field (known: {', '.join(_SCHEMA[section])})", name)
                if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
                    raise ConfigError(f"must be {type_name(want, name)}, not {type(value).__name__}", name)

        def get(section: str, key: str) -> Any:
            return data.get(section, {}).get(key)

        if get("module", "path") is None:
            raise ConfigError("is required (the PKCS#11 module to load)", "module.path")
        if get("group", "token_label") is None:
            raise ConfigError("is required (the label of the token or HA slot)", "group.token_label")
        pin_file = get("group", "pin_file")
        if pin_file is not None and base_dir is not None and not os.path.isabs(pin_file):
            pin_file = str(base_dir / pin_file)
        kwargs: dict[str, Any] = {
            "module_path": get("module", "path"),
            "token_label": get("group", "token_label"),
            "pin_file": pin_file,
            "pin_env": get("group", "pin_env"),
            "module_env": dict(get("module", "env") or {}),
            "members": _members(get("group", "members") or [], base_dir),
            "serials": check_serials(get("group", "serials") or [], "group.serials"),
            "source": source,
        }
        names = {
            ("workers", "count"): "workers",
            ("workers", "batch_size"): "batch_size",
            ("timeouts", "call_s"): "call_s",
            ("timeouts", "probe_s"): "probe_s",
            ("timeouts", "probe_interval_s"): "probe_interval_s",
            ("timeouts", "start_s"): "start_s",
            ("recovery", "backoff_initial_s"): "backoff_initial_s",
            ("recovery", "backoff_max_s"): "backoff_max_s",
            ("recovery", "give_up_after_s"): "give_up_after_s",
            ("admission", "policy"): "policy",
            ("admission", "queue_max"): "queue_max",
            ("admission", "op_deadline_s"): "op_deadline_s",
            ("testing", "fault_injection"): "fault_injection",
        }
        for (section, key), attr in names.items():
            value = get(section, key)
            if value is not None:
                # seconds: checked before float(), which overflows on a huge TOML integer
                kwargs[attr] = float(check_seconds(value, f"{section}.{key}")) if attr.endswith("_s") else value
        config = cls(**kwargs)
        config.validate(local)
        return config

    def member_configs(self) -> list[tuple[str, Config]]:
        """Each member's name and the config its hosts use: this one with the member's
        module, environment (merged over ``[module] env``) and token label.

        A group that lists no members is one member, :data:`DEFAULT_MEMBER`, with this config.
        """
        if not self.members:
            return [(DEFAULT_MEMBER, self)]
        return [
            (
                m.name,
                replace(
                    self,
                    module_path=m.path or self.module_path,
                    module_env={**self.module_env, **m.env},
                    token_label=m.token_label or self.token_label,
                    members=(),
                ),
            )
            for m in self.members
        ]

    def replace(self, **changes: Any) -> Config:
        """A validated copy with some fields changed."""
        config = replace(self, **changes)
        config.validate()
        return config

    def validate(self, local: bool = True) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one.

        ``local=False`` leaves out what only the machine that runs the guard can check (that
        the module files exist): a client checking a config for other machines (Dask workers).
        """
        if not self.module_path:
            raise ConfigError("must not be empty", "module.path")
        if local and not os.path.exists(self.module_path):
            raise ConfigError(f"no such file {self.module_path!r} (the PKCS#11 module)", "module.path")
        if local and not os.path.isfile(self.module_path):
            raise ConfigError(f"{self.module_path!r} is not a file", "module.path")
        check_env(self.module_env, "module.env")
        if not self.token_label:
            raise ConfigError("must not be empty", "group.token_label")
        if (self.pin_file is None) == (self.pin_env is None):
            raise ConfigError("give exactly one of pin_file and pin_env", "group.pin_file")
        seen: set[str] = set()
        for i, member in enumerate(self.members):
            where = f"group.members[{i}]"
            if not _MEMBER_NAME.fullmatch(member.name):
                raise ConfigError(
                    f"{member.name!r} is not a member name (letters, digits, '.', '_', '-'; at most 64)",
                    f"{where}.name",
                )
            if member.name in seen:
                raise ConfigError(f"{member.name!r} is listed twice; member names must be unique", f"{where}.name")
            seen.add(member.name)
            check_env(member.env, f"{where}.env")
            if local and member.path is not None and not os.path.isfile(member.path):
                raise ConfigError(f"no such file {member.path!r} (the member's PKCS#11 module)", f"{where}.path")
            if member.token_label is not None and not member.token_label:
                raise ConfigError("must not be empty", f"{where}.token_label")
        check_serials(self.serials, "group.serials")
        _positive(self.workers, "workers.count", 1, 1024)
        _positive(self.batch_size, "workers.batch_size", 1, 100_000)
        for attr, name in (
            ("call_s", "timeouts.call_s"),
            ("probe_s", "timeouts.probe_s"),
            ("probe_interval_s", "timeouts.probe_interval_s"),
            ("start_s", "timeouts.start_s"),
            ("backoff_initial_s", "recovery.backoff_initial_s"),
            ("backoff_max_s", "recovery.backoff_max_s"),
            ("op_deadline_s", "admission.op_deadline_s"),
        ):
            check_seconds(getattr(self, attr), name)
        if self.give_up_after_s is not None:
            check_seconds(self.give_up_after_s, "recovery.give_up_after_s")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("must be >= recovery.backoff_initial_s", "recovery.backoff_max_s")
        if self.policy not in ("queue", "fail_fast"):
            raise ConfigError(f"must be 'queue' or 'fail_fast', not {self.policy!r}", "admission.policy")
        _positive(self.queue_max, "admission.queue_max", 1, 10_000_000)

    def load_pin(self) -> Secret:
        """Read the PIN now (from ``pin_file`` or ``pin_env``).

        A PIN file must be a regular file of at most 4 KiB; one final newline (``\\n`` or
        ``\\r\\n``) is removed, nothing else. A ``pin_env`` value is used exactly as it is.

        Raises:
            ConfigError: unreadable or not a regular file, too large, unset variable, or an
                empty PIN (names the field).
        """
        if self.pin_file is not None:
            value, where = read_pin_file(self.pin_file), "group.pin_file"
        else:
            assert self.pin_env is not None
            env_value = os.environ.get(self.pin_env)
            if env_value is None:
                raise ConfigError(f"environment variable {self.pin_env} is not set", "group.pin_env")
            value, where = env_value, "group.pin_env"
        if not value:
            raise ConfigError("the PIN is empty", where)
        return Secret(value)


def _members(raw: list[Any], base_dir: Path | None) -> tuple[Member, ...]:
    """``[[group.members]]`` tables as :class:`Member` (types checked; values by ``validate``)."""
    out = []
    for i, table in enumerate(raw):
        where = f"group.members[{i}]"
        if not isinstance(table, dict):
            raise ConfigError("must be a table ([[group.members]])", where)
        for key, value in table.items():
            want = _MEMBER_SCHEMA.get(key)
            if want is None:
                raise ConfigError(f"unknown field (known: {', '.join(_MEMBER_SCHEMA)})", f"{where}.{key}")
            if not isinstance(value, want):
                raise ConfigError(f"must be {type_name(want)}, not {type(value).__name__}", f"{where}.{key}")
        if "name" not in table:
            raise ConfigError("is required (how status and logs call this member)", f"{where}.name")
        path = table.get("path")
        if path is not None and base_dir is not None and not os.path.isabs(path):
            path = str(base_dir / path)
        out.append(Member(table["name"], dict(table.get("env", {})), path, table.get("token_label")))
    return tuple(out)


def _positive(value: int, name: str, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"must be between {low} and {high}, not {value}", name)
