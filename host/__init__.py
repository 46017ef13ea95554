"""Host processes: one PKCS#11 module instance and one session per child process.

Two sides live here. The child (``python -m p11guard.host``: :mod:`._main`, :mod:`._ops`
and the op modules) loads PyKCS11 and msgpack and nothing else of the library: this
package's names are imported lazily, so a host never imports :mod:`psutil`, pykka or the
facade. The parent side is :class:`HostProcess`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p11guard.host._process import ENV_PASSTHROUGH, HostProcess

__all__ = ["ENV_PASSTHROUGH", "HostProcess"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from p11guard.host import _process

        return getattr(_process, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
