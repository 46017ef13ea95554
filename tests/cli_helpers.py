"""Helpers shared by the CLI tests: run `p11guard` in-process and check what a user sees."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from conftest import EC_KEY
from p11guard.cli import main
from p11guard.testbed import Testbed


def records_file(tmp_path: Path, n: int, name: str = "records.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"record number {i}\n" for i in range(1, n + 1)))
    return path


def sign_args(bed: Testbed, source: Path, out: Path, *extra: str, key: str = EC_KEY) -> list[str]:
    config = str(bed.direct_config_path)
    return ["sign", "--config", config, "--key", key, "--in", str(source), "--out", str(out), "--quiet", *extra]


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `p11guard ARGV`."""
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> str:
    """Exit 2 with ONE line on stderr, `p11guard: error: ...`, naming every word."""
    code, _, err = run(capsys, argv)
    err = err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("p11guard: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    return err


def entries(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_bytes().splitlines()]


def fingerprint(pem: bytes) -> str:
    der = load_pem_public_key(pem).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def verify_ec(pem: bytes, data: bytes, signature: bytes) -> None:
    """Raises InvalidSignature unless ``signature`` is an ECDSA-SHA256 signature of ``data``."""
    key = load_pem_public_key(pem)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature, data, ec.ECDSA(hashes.SHA256()))


def write_pubkey(bed: Testbed, path: Path, key: str = EC_KEY) -> Path:
    assert main(["pubkey", "--config", str(bed.direct_config_path), "--key", key, "--out", str(path)]) == 0
    return path
