"""Checks behind :class:`~p11guard.base.Config`: numbers of seconds, environment tables,
token serials and the PIN file. Each raises :class:`ConfigError` naming the field."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any

from p11guard.base._errors import ConfigError

__all__ = [
    "DAY_S",
    "MAX_PIN_FILE",
    "SECONDS_LIMITS",
    "check_env",
    "check_seconds",
    "check_serials",
    "file_kind",
    "read_pin_file",
    "type_name",
]

DAY_S = 86_400.0

#: Upper bounds of the fields in seconds that are not bounded by :data:`DAY_S`.
SECONDS_LIMITS: dict[str, float] = {"recovery.give_up_after_s": 30 * DAY_S}

#: A PIN file holds a PIN and a newline: anything bigger is not a PIN file.
MAX_PIN_FILE = 4096

_MAX_SERIAL = 64


def check_seconds(value: Any, name: str) -> float | int:
    """A finite number of seconds in ``(0, limit]``; the limit is 1 day unless listed in
    :data:`SECONDS_LIMITS`. Returns ``value``."""
    high = SECONDS_LIMITS.get(name, DAY_S)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"must be a number of seconds, not {type(value).__name__}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"must be a finite number of seconds, not {value}", name)
    if not 0 < value <= high:
        shown = f"{value:g}" if isinstance(value, float) or abs(value) < 10**15 else f"{str(value)[:12]}..."
        raise ConfigError(f"must be a number of seconds > 0 and <= {high:g} ({_days(high)}), not {shown}", name)
    return value


def _days(seconds: float) -> str:
    days = seconds / DAY_S
    return "1 day" if days == 1 else f"{days:g} days"


def _shown(key: str) -> str:
    """A key as it can be printed on one line (NUL and other controls escaped)."""
    return key if key.isprintable() and key else repr(key)


def check_env(env: Mapping[Any, Any], where: str) -> None:
    """Every name and value of an environment table is one the OS can take."""
    for key, value in env.items():
        name = f"{where}.{_shown(key) if isinstance(key, str) else repr(key)}"
        if not isinstance(key, str):
            raise ConfigError("names must be strings", name)
        if not key:
            raise ConfigError("an environment variable needs a name; remove the empty key", name)
        if "=" in key or "\0" in key:
            raise ConfigError(
                "is not a name an environment variable can have (no '=' or NUL character); rename it", name
            )
        if not isinstance(value, str):
            raise ConfigError("values must be strings", name)
        if "\0" in value:
            raise ConfigError("the value contains a NUL character, which no environment variable can hold", name)


def check_serials(serials: Sequence[Any], name: str) -> tuple[str, ...]:
    """Token serial numbers: a list of unique, non-empty strings without surrounding spaces."""
    if isinstance(serials, str) or not isinstance(serials, Sequence):
        raise ConfigError(f"must be a list of strings, not {type(serials).__name__}", name)
    seen: set[str] = set()
    for i, serial in enumerate(serials):
        where = f"{name}[{i}]"
        if not isinstance(serial, str):
            raise ConfigError(f"must be a string (a token serial number), not {type(serial).__name__}", where)
        if not serial or serial.strip() != serial or not serial.isprintable():
            raise ConfigError(
                f"{serial!r} is not a serial number (printable, not empty, no leading or trailing spaces)", where
            )
        if len(serial) > _MAX_SERIAL:
            raise ConfigError(f"is {len(serial)} characters; a serial number has at most {_MAX_SERIAL}", where)
        if serial in seen:
            raise ConfigError(f"{serial!r} is listed twice", where)
        seen.add(serial)
    return tuple(serials)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (``"a FIFO"``, ``"a character device"``...)."""
    for test, text in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return text
    return "not a regular file"


def read_pin_file(path: str) -> str:
    """The PIN in ``path``: a regular file of at most :data:`MAX_PIN_FILE` bytes, UTF-8, with
    one final newline (``\\n`` or ``\\r\\n``) removed and nothing else.

    Never blocks: the type is checked before opening, and the file is opened non-blocking
    and checked again (it may have been swapped in between).
    """
    where = "group.pin_file"

    def refuse(what: str) -> ConfigError:
        return ConfigError(f"PIN file {path!r} {what}", where)

    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read PIN file {path!r}: {exc.strerror or exc}", where) from None
    if not stat.S_ISREG(info.st_mode):
        raise refuse(f"is {file_kind(info.st_mode)}, not a regular file: point pin_file at a file holding the PIN")
    too_big = refuse(f"is larger than {MAX_PIN_FILE} bytes: a PIN file holds the PIN and at most one newline")
    if info.st_size > MAX_PIN_FILE:
        raise too_big
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ConfigError(f"cannot read PIN file {path!r}: {exc.strerror or exc}", where) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refuse("is not a regular file (it changed while being opened)")
        data = b""
        while chunk := os.read(fd, MAX_PIN_FILE + 1 - len(data)):
            data += chunk
            if len(data) > MAX_PIN_FILE:
                raise too_big
    except OSError as exc:
        raise ConfigError(f"cannot read PIN file {path!r}: {exc.strerror or exc}", where) from None
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("is not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def type_name(want: type | tuple[type, ...], field: str | None = None) -> str:
    """How an error says the type a field wants."""
    if field == "group.serials":
        return "a list of strings"
    names = {
        "str": "a string",
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "dict": "a table",
        "list": "a list of tables",
    }
    if isinstance(want, tuple):
        return "a number"
    return names.get(want.__name__, want.__name__)
