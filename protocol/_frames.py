"""Length-prefixed msgpack frames over one end of a socket pair.

A frame is a 4-byte big-endian length and one msgpack map. :class:`Channel` reads and
writes frames on a raw file descriptor (no :mod:`multiprocessing`: a host process loads
as little as it can); ``recv(max_frame)`` enforces the size limit on the way in,
:func:`encode` on the way out. A frame that cannot be read or decoded poisons the
channel: the caller closes it and treats the peer as broken. Nobody resyncs a byte stream.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import msgpack

__all__ = ["MAX_FRAME", "Channel", "FrameError", "decode", "encode"]

#: Default maximum frame size, enforced on both sides.
MAX_FRAME = 16 * 1024 * 1024

_HEADER = struct.Struct("!I")


class FrameError(ValueError):
    """A frame is too large, not msgpack, or not a map."""


def encode(message: dict[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    """Encode one message; refuse it if it exceeds ``max_frame`` bytes."""
    data: bytes = msgpack.packb(message, use_bin_type=True)
    if len(data) > max_frame:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {max_frame} bytes")
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Decode one frame into a map with string keys.

    Raises:
        FrameError: the bytes are not one msgpack map with string keys.
    """
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame ({type(exc).__name__}: {exc})") from exc
    if not isinstance(message, dict):
        raise FrameError(f"frame is a {type(message).__name__}, not a map")
    return message


class Channel:
    """Frames over a blocking stream file descriptor (one end of a ``socketpair``).

    ``send`` and ``recv`` raise ``OSError`` (``BrokenPipeError``, ``ConnectionError``...)
    when the peer is gone, ``EOFError`` on a clean end of stream, and :class:`FrameError`
    for a length over the limit (the channel is then poisoned).
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def send(self, data: bytes) -> None:
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self._fd, view) :]

    def recv(self, max_frame: int = MAX_FRAME) -> bytes:
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        if size > max_frame:
            raise FrameError(f"frame of {size} bytes exceeds the limit of {max_frame} bytes")
        return self._read(size) if size else b""

    def _read(self, n: int) -> bytes:
        data = os.read(self._fd, n)
        if len(data) == n:
            return data
        parts, got = [data], len(data)
        while data and got < n:
            data = os.read(self._fd, n - got)
            parts.append(data)
            got += len(data)
        if got < n:
            raise EOFError("end of stream inside a frame" if got else "end of stream")
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
