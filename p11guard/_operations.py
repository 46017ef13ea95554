"""Every operation in its three forms: ``submit_*`` (a Future), blocking, ``a*`` (asyncio).

Sugar over one method, :meth:`Operations._submit`, which :class:`~p11guard.Guard` implements.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from p11guard._aio import awaitable
from p11guard.base import Config

__all__ = ["Operations"]

T = TypeVar("T")


class Operations:
    """The operations of a :class:`~p11guard.Guard` (see there)."""

    config: Config

    def _submit(
        self,
        op: str,
        args: dict[str, Any],
        label: str | None = None,
        items: list[tuple[str, dict[str, Any]]] | None = None,
    ) -> Future[Any]:
        raise NotImplementedError

    def _call(self, op: str, args: dict[str, Any], label: str | None = None) -> Any:
        """The blocking form of one operation (on a free worker's host, from this thread,
        when one is free and nothing waits)."""
        return self._submit(op, args, label).result()

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- submission ---------------------------------------------------------------------

    def submit(self, op: str, **args: Any) -> Future[Any]:
        """Submit any host operation by name (see :mod:`p11guard.protocol`)."""
        return self._submit(op, args, label=args.get("label"))

    def submit_batch(self, items: Sequence[tuple[str, dict[str, Any]]]) -> Future[list[Any]]:
        """Submit many operations as one frame; the result lists a value or an exception each."""
        if not items:
            done: Future[list[Any]] = Future()
            done.set_result([])
            return done
        return self._submit("batch", {}, items=[(op, dict(a)) for op, a in items])

    def submit_sign(self, key: str, data: bytes, mechanism: str = "ecdsa-sha256") -> Future[bytes]:
        return self._submit("sign", {"key": key, "data": data, "mechanism": mechanism})

    def submit_sign_digest(self, key: str, digest: bytes, mechanism: str = "ecdsa-sha256") -> Future[bytes]:
        return self._submit("sign_digest", {"key": key, "digest": digest, "mechanism": mechanism})

    def submit_verify(self, key: str, data: bytes, signature: bytes, mechanism: str = "ecdsa-sha256") -> Future[bool]:
        return self._submit("verify", {"key": key, "data": data, "signature": signature, "mechanism": mechanism})

    def submit_verify_digest(
        self, key: str, digest: bytes, signature: bytes, mechanism: str = "ecdsa-sha256"
    ) -> Future[bool]:
        return self._submit("verify", {"key": key, "digest": digest, "signature": signature, "mechanism": mechanism})

    def submit_encrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> Future[bytes]:
        return self._submit("encrypt", {"key": key, "data": data, "mechanism": mechanism, "aad": aad})

    def submit_decrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> Future[bytes]:
        return self._submit("decrypt", {"key": key, "data": data, "mechanism": mechanism, "aad": aad})

    def submit_digest(self, data: bytes, mechanism: str = "sha256") -> Future[bytes]:
        return self._submit("digest", {"data": data, "mechanism": mechanism})

    def submit_random(self, n: int) -> Future[bytes]:
        return self._submit("random", {"n": n})

    def submit_public_key(self, key: str) -> Future[bytes]:
        return self._submit("public_key", {"key": key})

    def submit_generate_key_pair(self, label: str, type: str) -> Future[dict[str, Any]]:
        return self._submit("generate_key_pair", {"label": label, "type": type}, label=label)

    def submit_generate_secret(self, label: str, type: str, extractable: bool = False) -> Future[dict[str, Any]]:
        args = {"label": label, "type": type, "extractable": extractable}
        return self._submit("generate_secret", args, label=label)

    def submit_wrap(self, key: str, target: str, mechanism: str = "aes-key-wrap-pad") -> Future[bytes]:
        return self._submit("wrap", {"key": key, "target": target, "mechanism": mechanism})

    def submit_unwrap(
        self,
        key: str,
        wrapped: bytes,
        label: str,
        type: str,
        mechanism: str = "aes-key-wrap-pad",
        extractable: bool = False,
    ) -> Future[dict[str, Any]]:
        args = {"key": key, "wrapped": wrapped, "label": label, "type": type, "mechanism": mechanism}
        return self._submit("unwrap", {**args, "extractable": extractable}, label=label)

    def submit_derive(
        self, key: str, peer: bytes, label: str, type: str = "aes-256", mechanism: str = "ecdh"
    ) -> Future[dict[str, Any]]:
        args = {"key": key, "peer": peer, "label": label, "type": type, "mechanism": mechanism}
        return self._submit("derive", args, label=label)

    def submit_key_info(self, key: str) -> Future[dict[str, Any]]:
        return self._submit("key_info", {"key": key})

    def submit_destroy(self, label: str) -> Future[int]:
        return self._submit("destroy", {"label": label}, label=label)

    def submit_list_keys(self) -> Future[list[dict[str, Any]]]:
        return self._submit("list_keys", {})

    # -- blocking forms -----------------------------------------------------------------

    def sign(self, key: str, data: bytes, mechanism: str = "ecdsa-sha256") -> bytes:
        """Sign ``data`` with the private key labelled ``key``. ECDSA signatures are DER."""
        return self._call("sign", {"key": key, "data": data, "mechanism": mechanism})  # type: ignore[no-any-return]

    def sign_digest(self, key: str, digest: bytes, mechanism: str = "ecdsa-sha256") -> bytes:
        """Sign a digest computed elsewhere (ECDSA, ``rsa-pkcs1-*``, ``rsa-pss-*``): ``digest``
        must be of the mechanism's hash and length; the signature is the one ``sign`` gives
        for the data behind it."""
        return self._call("sign_digest", {"key": key, "digest": digest, "mechanism": mechanism})  # type: ignore[no-any-return]

    def verify(self, key: str, data: bytes, signature: bytes, mechanism: str = "ecdsa-sha256") -> bool:
        """``True`` if ``signature`` is valid for ``data`` under the public key ``key``."""
        return self._call("verify", {"key": key, "data": data, "signature": signature, "mechanism": mechanism})  # type: ignore[no-any-return]

    def verify_digest(self, key: str, digest: bytes, signature: bytes, mechanism: str = "ecdsa-sha256") -> bool:
        """``True`` if ``signature`` is valid for the data whose digest is ``digest``."""
        return self.submit_verify_digest(key, digest, signature, mechanism).result()

    def encrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> bytes:
        """``aes-gcm``: IV (12 bytes) + ciphertext + tag; ``aes-cbc-pad``: IV (16 bytes) +
        ciphertext; ``rsa-oaep-sha256`` (the public key of ``key``): the ciphertext."""
        return self._call("encrypt", {"key": key, "data": data, "mechanism": mechanism, "aad": aad})  # type: ignore[no-any-return]

    def decrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> bytes:
        return self._call("decrypt", {"key": key, "data": data, "mechanism": mechanism, "aad": aad})  # type: ignore[no-any-return]

    def digest(self, data: bytes, mechanism: str = "sha256") -> bytes:
        return self._call("digest", {"data": data, "mechanism": mechanism})  # type: ignore[no-any-return]

    def random(self, n: int) -> bytes:
        return self._call("random", {"n": n})  # type: ignore[no-any-return]

    def public_key(self, key: str) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo)."""
        return self._call("public_key", {"key": key})  # type: ignore[no-any-return]

    def generate_key_pair(self, label: str, type: str) -> dict[str, Any]:
        """Generate ``ec-p256``, ``ec-p384``, ``rsa-2048``, ``rsa-3072`` or ``ed25519``.
        Never retried after a loss: raises :class:`OutcomeUnknown` instead."""
        return self.submit_generate_key_pair(label, type).result()

    def generate_secret(self, label: str, type: str, extractable: bool = False) -> dict[str, Any]:
        """Generate ``aes-128``/``-192``/``-256`` or ``hmac-sha256``/``-384``/``-512``
        (``extractable``: it may be wrapped; it stays sensitive)."""
        return self.submit_generate_secret(label, type, extractable).result()

    def wrap(self, key: str, target: str, mechanism: str = "aes-key-wrap-pad") -> bytes:
        """The extractable secret key ``target`` wrapped under ``key`` (an AES key, or
        ``rsa-oaep-sha256`` with an RSA public key)."""
        return self.submit_wrap(key, target, mechanism).result()

    def unwrap(
        self,
        key: str,
        wrapped: bytes,
        label: str,
        type: str,
        mechanism: str = "aes-key-wrap-pad",
        extractable: bool = False,
    ) -> dict[str, Any]:
        """Make the secret key ``label`` of ``type`` on the token from ``wrapped`` under ``key``.
        Changes the token: never retried after a loss (:class:`OutcomeUnknown`)."""
        return self.submit_unwrap(key, wrapped, label, type, mechanism, extractable).result()

    def derive(
        self, key: str, peer: bytes, label: str, type: str = "aes-256", mechanism: str = "ecdh"
    ) -> dict[str, Any]:
        """ECDH of the private key ``key`` with ``peer`` (PEM, DER or the point) into the
        secret key ``label`` on the token (no KDF: the token cuts the shared secret)."""
        return self.submit_derive(key, peer, label, type, mechanism).result()

    def key_info(self, key: str) -> dict[str, Any]:
        """What ``key`` (a label or a PKCS#11 URI) names: label, id, type, classes."""
        return self.submit_key_info(key).result()

    def mechanisms(self, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
        """The mechanism table each serving member negotiated at session open:
        ``{member: {"token": {...}, "mechanisms": {name: {"via", "hash", ...}}}}``.

        Asks the workers (op ``mechanisms``) until every serving member has answered."""
        end = time.monotonic() + timeout_s
        out: dict[str, dict[str, Any]] = {}
        while True:
            status = self.status()
            member_of = {w["pid"]: w["member"] for w in status.get("workers", []) if w.get("pid")}
            serving = {m["name"] for m in status.get("members", []) if m.get("state") == "serving"}
            futures = [self._submit("mechanisms", {}) for _ in range(max(1, len(member_of)))]
            for future in futures:
                reply = future.result(max(0.1, end - time.monotonic()))
                member = member_of.get(reply["pid"])
                if member is not None and member not in out:
                    out[member] = {"token": reply["token"], "mechanisms": reply["mechanisms"]}
            if serving <= out.keys() or time.monotonic() > end:
                return out

    def destroy(self, label: str) -> int:
        """Destroy every object labelled ``label``; returns how many."""
        return self.submit_destroy(label).result()

    def list_keys(self) -> list[dict[str, Any]]:
        return self.submit_list_keys().result()

    def sign_many(
        self,
        key: str,
        items: Iterable[bytes],
        mechanism: str = "ecdsa-sha256",
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Sign many items, order kept, in batch frames spread over the workers.

        Args:
            return_exceptions: put the exception of a failed item in its place instead of
                raising the first one.
        """
        futures = [f for _, f in self.submit_sign_many(key, items, mechanism)]
        out: list[Any] = []
        for future in futures:
            out.extend(future.result())
        if not return_exceptions:
            for item in out:
                if isinstance(item, BaseException):
                    raise item
        return out

    def submit_sign_many(
        self, key: str, items: Iterable[bytes], mechanism: str = "ecdsa-sha256"
    ) -> list[tuple[int, Future[list[Any]]]]:
        """Submit signatures in batch frames; returns ``(count, future)`` per frame, in order.
        A frame holds at most ``workers.batch_size`` items and 8 MiB (1 KiB counted per item);
        an item over 16 MiB less 64 KiB is not sent: its frame of one holds a RequestError."""
        from p11guard.base import RequestError
        from p11guard.protocol import MAX_FRAME

        out: list[tuple[int, Future[list[Any]]]] = []
        chunk: list[tuple[str, dict[str, Any]]] = []
        size, item_max = 0, MAX_FRAME - 64 * 1024
        for i, data in enumerate(items):
            cost, too_large = len(data) + 1024, len(data) > item_max
            if chunk and (len(chunk) >= self.config.batch_size or size + cost > 8 * 1024 * 1024 or too_large):
                out.append((len(chunk), self.submit_batch(chunk)))
                chunk, size = [], 0
            if too_large:
                why = f"item {i}: {len(data):,} bytes is more than the {item_max:,} bytes one PKCS#11 call through "
                why += "p11guard can carry (a frame is at most 16 MiB; this is fixed): sign it another way or split it"
                out.append((1, Future()))
                out[-1][1].set_result([RequestError(why, kind="bad_request", name="too_large", op="sign")])
                continue
            chunk.append(("sign", {"key": key, "data": data, "mechanism": mechanism}))
            size += cost
        if chunk:
            out.append((len(chunk), self.submit_batch(chunk)))
        return out

    # -- asyncio forms ------------------------------------------------------------------

    async def _await(self, future: Future[T]) -> T:
        return await awaitable(future)

    async def asign(self, key: str, data: bytes, mechanism: str = "ecdsa-sha256") -> bytes:
        return await self._await(self.submit_sign(key, data, mechanism))

    async def asign_digest(self, key: str, digest: bytes, mechanism: str = "ecdsa-sha256") -> bytes:
        return await self._await(self.submit_sign_digest(key, digest, mechanism))

    async def averify(self, key: str, data: bytes, signature: bytes, mechanism: str = "ecdsa-sha256") -> bool:
        return await self._await(self.submit_verify(key, data, signature, mechanism))

    async def averify_digest(self, key: str, digest: bytes, signature: bytes, mechanism: str = "ecdsa-sha256") -> bool:
        return await self._await(self.submit_verify_digest(key, digest, signature, mechanism))

    async def aencrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> bytes:
        return await self._await(self.submit_encrypt(key, data, mechanism, aad))

    async def adecrypt(self, key: str, data: bytes, mechanism: str = "aes-gcm", aad: bytes = b"") -> bytes:
        return await self._await(self.submit_decrypt(key, data, mechanism, aad))

    async def adigest(self, data: bytes, mechanism: str = "sha256") -> bytes:
        return await self._await(self.submit_digest(data, mechanism))

    async def arandom(self, n: int) -> bytes:
        return await self._await(self.submit_random(n))

    async def apublic_key(self, key: str) -> bytes:
        return await self._await(self.submit_public_key(key))

    async def agenerate_key_pair(self, label: str, type: str) -> dict[str, Any]:
        return await self._await(self.submit_generate_key_pair(label, type))

    async def agenerate_secret(self, label: str, type: str, extractable: bool = False) -> dict[str, Any]:
        return await self._await(self.submit_generate_secret(label, type, extractable))

    async def awrap(self, key: str, target: str, mechanism: str = "aes-key-wrap-pad") -> bytes:
        return await self._await(self.submit_wrap(key, target, mechanism))

    async def aunwrap(
        self,
        key: str,
        wrapped: bytes,
        label: str,
        type: str,
        mechanism: str = "aes-key-wrap-pad",
        extractable: bool = False,
    ) -> dict[str, Any]:
        return await self._await(self.submit_unwrap(key, wrapped, label, type, mechanism, extractable))

    async def aderive(
        self, key: str, peer: bytes, label: str, type: str = "aes-256", mechanism: str = "ecdh"
    ) -> dict[str, Any]:
        return await self._await(self.submit_derive(key, peer, label, type, mechanism))

    async def akey_info(self, key: str) -> dict[str, Any]:
        return await self._await(self.submit_key_info(key))

    async def adestroy(self, label: str) -> int:
        return await self._await(self.submit_destroy(label))

    async def alist_keys(self) -> list[dict[str, Any]]:
        return await self._await(self.submit_list_keys())

    async def asign_many(self, key: str, items: Iterable[bytes], mechanism: str = "ecdsa-sha256") -> list[bytes]:
        futures = [f for _, f in self.submit_sign_many(key, items, mechanism)]
        out: list[bytes] = []
        for chunk in await asyncio.gather(*(awaitable(f) for f in futures)):
            for item in chunk:
                if isinstance(item, BaseException):
                    raise item
                out.append(item)
        return out
