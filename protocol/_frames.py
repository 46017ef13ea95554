"""Length-prefixed msgpack frames over a ``multiprocessing.connection.Connection``.

A frame is one msgpack map. ``send_bytes`` / ``recv_bytes`` provide the length prefix;
``recv_bytes(maxlength)`` enforces the size limit on the way in, :func:`encode` on the
way out. A frame that cannot be read or decoded poisons the channel: the caller closes
it and treats the peer as broken. Nobody tries to resync a byte stream.
"""

from __future__ import annotations

from typing import Any

import msgpack

__all__ = ["MAX_FRAME", "FrameError", "decode", "encode"]

#: Default maximum frame size, enforced on both sides.
MAX_FRAME = 16 * 1024 * 1024


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
