"""How a host process is started: its command line and its environment (and nothing else)."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Mapping

__all__ = ["ENV_PASSTHROUGH", "child_env", "host_command"]

#: The only variables of the parent's environment a host sees (plus the module's ``env``):
#: nothing else of the parent -- above all no PIN variable -- reaches the child.
ENV_PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "PYTHONPATH", "SOFTHSM2_CONF")


@functools.cache
def _host_path() -> tuple[str, ...]:
    """Where a host (started with ``python -S``) finds p11guard, PyKCS11 and msgpack."""
    out: list[str] = []
    for name in ("p11guard", "PyKCS11", "msgpack"):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin:
            path = os.path.dirname(os.path.dirname(os.path.realpath(origin)))
            if path not in out:
                out.append(path)
    return tuple(out)


def host_command(fd: int) -> list[str]:
    """``python -S -m p11guard.host --fd FD --parent PID``.

    ``-S``: no site (no ``.pth`` files, no editable-install finder): ~2.4 MiB and ~10 ms
    less per host; the few directories a host imports from are in its ``PYTHONPATH``.
    The PIN is never on it: it travels in the ``open`` frame.
    """
    return [sys.executable, "-S", "-m", "p11guard.host", "--fd", str(fd), "--parent", str(os.getpid())]


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The passthrough variables of ours, the module's ``env`` over them, and the path."""
    env = {k: os.environ[k] for k in ENV_PASSTHROUGH if k in os.environ}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([*_host_path(), *filter(None, [env.get("PYTHONPATH")])])
    return env
