"""Two PKCS#11 implementations for the operation tests: SoftHSM2 and opencryptoki, in-process.

``token`` (a fixture of the test modules that import it) opens a host on each backend's
token, with one key of every type the token can make (a type it cannot make is kept as
the token's refusal), a known AES key made by OpenSC's ``pkcs11-tool`` and the negotiated
mechanism table. Other tools get the PIN on stdin (through a pty, as ``pkcs11-tool``
wants it), never on a command line.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from conftest import spawn_host
from p11guard import Config, MechanismUnsupported
from p11guard.host import HostProcess
from p11guard.testbed import Testbed

BACKENDS = ("softhsm", "opencryptoki")
#: label -> type of the keys every token gets (those it can make).
TOKEN_KEYS = {
    "m-ec256": "ec-p256",
    "m-ec384": "ec-p384",
    "m-ec521": "ec-p521",
    "m-rsa2048": "rsa-2048",
    "m-rsa4096": "rsa-4096",
    "m-ed": "ed25519",
    "m-aes128": "aes-128",
    "m-aes256": "aes-256",
    "m-hmac384": "hmac-sha384",
    "m-hmac512": "hmac-sha512",
}
#: A known AES-256 key, written to each token by pkcs11-tool (label m-kek).
KEK = bytes(range(32))
KEK_LABEL = "m-kek"


@dataclass
class Token:
    """One backend's token, seen through an open host."""

    backend: str
    bed: Testbed
    config: Config
    host: HostProcess
    table: dict[str, dict[str, Any]]
    refused: dict[str, MechanismUnsupported] = field(default_factory=dict)  #: label -> why it was not made

    def key(self, label: str) -> str:
        """``label``, or a skip with the token's own refusal to make it."""
        if label in self.refused:
            error = self.refused[label]
            assert self.config.token_label in str(error) and "cannot generate" in str(error)
            pytest.skip(f"{self.backend}: {error.message}")
        return label

    def offers(self, name: str, use: str) -> bool:
        return use in self.table[name]["uses"]

    def call(self, op: str, **args: Any) -> Any:
        return self.host.call(op, args, 120)

    def tool(self, *argv: str) -> str:
        """Run OpenSC's pkcs11-tool on this token, logged in with the PIN typed on a pty."""
        tool = shutil.which("pkcs11-tool")
        assert tool, "pkcs11-tool is missing: apt-get install opensc"
        env = {**os.environ, **self.config.module_env}
        base = [tool, "--module", self.config.module_path, "--token-label", self.config.token_label, "--login"]
        code, out = run_on_pty([*base, *argv], self.bed.pin.reveal(), env)
        assert code == 0, out
        return out

    def known_secret(self, label: str, ktype: str, value: bytes) -> str:
        """A secret key of known ``value`` on the token: unwrapped under the known AES key
        (AES key wrap with padding) or under the RSA key (RSA-OAEP), whichever it offers."""
        have = {k["label"] for k in self.call("list_keys")}
        if label in have:
            return label
        if self.offers("aes-key-wrap-pad", "wrap"):
            wrapped, key, mech = aes_key_wrap_with_padding(KEK, value), KEK_LABEL, "aes-key-wrap-pad"
        else:
            public = load_pem_public_key(self.call("public_key", key="m-rsa2048"))
            oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
            wrapped, key, mech = public.encrypt(value, oaep), "m-rsa2048", "rsa-oaep-sha256"  # type: ignore[union-attr]
        self.call("unwrap", key=key, wrapped=wrapped, label=label, type=ktype, mechanism=mech)
        return label


def run_on_pty(argv: list[str], pin: str, env: dict[str, str], timeout: float = 120.0) -> tuple[int, str]:
    """Run ``argv`` with the PIN on stdin and stdout on a pty (pkcs11-tool reads a PIN from
    stdin only then); returns the exit code and what it printed."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=slave, stderr=slave, env=env)
    finally:
        os.close(slave)
    assert proc.stdin is not None
    proc.stdin.write(pin.encode() + b"\n")
    proc.stdin.close()
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError(f"{argv[0]} printed nothing for {timeout} s: {out.decode(errors='replace')}")
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    return proc.wait(timeout), out.decode(errors="replace")


def open_token(backend: str, testbeds: Callable[..., Testbed], tmp: Path) -> Iterator[Token]:
    """The body of a ``token`` fixture: the backend's testbed, a host on it, the keys."""
    bed = testbeds(1, backend)
    config = Config.from_file(bed.direct_config_path)  # in-process on both backends
    host = spawn_host(config)
    try:
        info = host.open(config.token_label, bed.pin, 30)
        token = Token(backend, bed, config, host, info["mechanisms"])
        have = {k["label"] for k in token.call("list_keys")}
        for label, ktype in TOKEN_KEYS.items():
            if label in have:
                continue
            op = "generate_secret" if ktype.startswith(("aes", "hmac")) else "generate_key_pair"
            try:
                token.call(op, label=label, type=ktype)
            except MechanismUnsupported as exc:
                token.refused[label] = exc
        if KEK_LABEL not in have:
            kek = tmp / "kek.bin"
            kek.write_bytes(KEK)
            token.tool(
                "--write-object", str(kek), "--type", "secrkey", "--key-type", "AES:32", "--usage-decrypt",
                "--label", KEK_LABEL, "--id", "4b454b", "--sensitive", "--private",
            )  # fmt: skip
            kek.unlink()
        yield token
    finally:
        host.kill()
