"""How a key is named: a label, or a PKCS#11 URI (RFC 7512) by ``object``, ``id`` and ``type``.

``pkcs11:token=ha-group;object=release-key;type=private`` and ``pkcs11:id=%01%02`` name keys
made by other tools (``pkcs11-tool``, ``p11tool``, openssl's pkcs11 provider). The token
attributes (``token``, ``serial``, ``manufacturer``, ``model``) must match the token the
guard is configured for; library and slot attributes are accepted and not used. A PIN in
a URI (``pin-value``) is refused: the guard's PIN comes from its config.
"""

from __future__ import annotations

from typing import NamedTuple

import PyKCS11

from p11guard.host._args import BadRequest, Refusal

__all__ = ["KeyRef", "check_token", "parse_key_ref"]

#: RFC 7512 ``type`` values -> object class.
TYPES = {
    "private": PyKCS11.CKO_PRIVATE_KEY,
    "public": PyKCS11.CKO_PUBLIC_KEY,
    "secret-key": PyKCS11.CKO_SECRET_KEY,
}
_TOKEN_ATTRS = ("token", "serial", "manufacturer", "model")
_IGNORED = frozenset(
    {
        "library-manufacturer",
        "library-description",
        "library-version",
        "slot-manufacturer",
        "slot-description",
        "slot-id",
        "module-name",
        "module-path",
        "pin-source",
    }
)
_EXAMPLE = "e.g. pkcs11:token=my-token;object=my-key;type=private or pkcs11:id=%01%02"


class KeyRef(NamedTuple):
    """A parsed key reference."""

    text: str
    label: str | None
    key_id: bytes | None
    cls: int | None  #: the URI's ``type``, as a CKO_* class
    token: dict[str, str]  #: the URI's token attributes


def _unquote(value: str, text: str) -> bytes:
    """RFC 3986 percent-decoding, to bytes (``id`` is binary)."""
    out = bytearray()
    i = 0
    raw = value.encode()
    while i < len(raw):
        if raw[i] == 0x25:  # %
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in pair):
                raise BadRequest(f"key URI {text!r}: a '%' must be followed by two hex digits")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def parse_key_ref(text: str) -> KeyRef:
    """A label, or a ``pkcs11:`` URI.

    Raises:
        BadRequest: a malformed URI, an unknown or repeated attribute, or a PIN in it.
    """
    if not text:
        raise BadRequest("a key must be named: a label, or a PKCS#11 URI")
    if not text.lower().startswith("pkcs11:"):
        return KeyRef(text, text, None, None, {})
    path, _, query = text[7:].partition("?")
    attrs: dict[str, bytes] = {}
    parts = [p for p in path.split(";") if p] + [q for q in query.split("&") if q]
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq:
            raise BadRequest(f"key URI {text!r}: {part!r} is not name=value ({_EXAMPLE})")
        if name == "pin-value":
            raise BadRequest(f"key URI {text!r} holds a PIN (pin-value): leave it out; the PIN comes from the config")
        if name in attrs:
            raise BadRequest(f"key URI {text!r} gives {name!r} twice")
        if name not in (*_TOKEN_ATTRS, "object", "id", "type") and name not in _IGNORED:
            raise BadRequest(f"key URI {text!r}: unknown attribute {name!r} ({_EXAMPLE})")
        attrs[name] = _unquote(value, text)
    try:
        strings = {k: v.decode() for k, v in attrs.items() if k != "id"}
    except UnicodeDecodeError:
        raise BadRequest(f"key URI {text!r}: an attribute other than id is not UTF-8") from None
    cls = None
    if "type" in strings:
        cls = TYPES.get(strings["type"])
        if cls is None:
            raise BadRequest(f"key URI {text!r}: type={strings['type']!r} is no key (private, public, secret-key)")
    if "object" not in strings and "id" not in attrs:
        raise BadRequest(f"key URI {text!r} names no key: give object= (the label) or id= ({_EXAMPLE})")
    token = {k: strings[k] for k in _TOKEN_ATTRS if k in strings}
    return KeyRef(text, strings.get("object"), attrs.get("id"), cls, token)


def check_token(ref: KeyRef, token: dict[str, str]) -> None:
    """Refuse a URI whose token attributes are not those of the guard's token."""
    for name in _TOKEN_ATTRS:
        want = ref.token.get(name)
        have = token.get("label" if name == "token" else name)
        if want is not None and want != have:
            field = " (config group.token_label)" if name == "token" else ""
            raise Refusal(
                "user",
                "key_token_mismatch",
                f"key URI {ref.text!r} names {name}={want!r}, but the guard's token has {name} {have!r}{field}: "
                f"fix {name}= in the URI or leave it out",
            )
