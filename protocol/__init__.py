"""The wire protocol between p11guard and its host processes.

Request ``{id, gen, op, args}``; reply ``{id, ok: result}`` or
``{id, err: {kind, ckr, name, message}}``. ``op = "batch"`` carries
``args = {items: [{op, args}, ...]}`` and answers ``ok = [{ok: ...} | {err: ...}, ...]``
in order.
"""

from p11guard.protocol._ckr import LOSS_KINDS, ckr_kind, ckr_name
from p11guard.protocol._frames import MAX_FRAME, FrameError, decode, encode
from p11guard.protocol._ops import (
    IDEMPOTENT_OPS,
    KEY_TYPES,
    MECHANISMS,
    OPS,
    SECRET_TYPES,
    TOKEN_CHANGING_OPS,
    default_mechanism,
)

__all__ = [
    "IDEMPOTENT_OPS",
    "KEY_TYPES",
    "LOSS_KINDS",
    "MAX_FRAME",
    "MECHANISMS",
    "OPS",
    "SECRET_TYPES",
    "TOKEN_CHANGING_OPS",
    "FrameError",
    "ckr_kind",
    "ckr_name",
    "decode",
    "default_mechanism",
    "encode",
]
