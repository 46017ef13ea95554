"""The wire protocol between p11guard and its host processes.

Request ``{id, gen, op, args}``; reply ``{id, ok: result}`` or
``{id, err: {kind, ckr, name, message}}``. ``op = "batch"`` carries
``args = {items: [{op, args}, ...]}`` and answers ``ok = [{ok: ...} | {err: ...}, ...]``
in order.
"""

from p11guard.protocol._frames import MAX_FRAME, Channel, FrameError, decode, encode
from p11guard.protocol._kinds import ANSWER_KINDS, ERROR_KINDS, LOSS_KINDS, SIGNAL_KINDS
from p11guard.protocol._ops import (
    DIGEST_SIZES,
    IDEMPOTENT_OPS,
    KEY_OPS,
    KEY_TYPES,
    MECHANISMS,
    OPS,
    SECRET_TYPES,
    TOKEN_CHANGING_OPS,
    MechanismSpec,
    default_mechanism,
    mechanisms_for,
)

__all__ = [
    "ANSWER_KINDS",
    "DIGEST_SIZES",
    "ERROR_KINDS",
    "IDEMPOTENT_OPS",
    "KEY_OPS",
    "KEY_TYPES",
    "LOSS_KINDS",
    "MAX_FRAME",
    "MECHANISMS",
    "OPS",
    "SECRET_TYPES",
    "SIGNAL_KINDS",
    "TOKEN_CHANGING_OPS",
    "Channel",
    "FrameError",
    "MechanismSpec",
    "decode",
    "default_mechanism",
    "encode",
    "mechanisms_for",
]
