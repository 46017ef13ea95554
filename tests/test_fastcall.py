"""The host's byte-vector reader: PyKCS11's output buffers read back exactly."""

from __future__ import annotations

import PyKCS11
import pytest

from p11guard.host._fastcall import _read_vector, vector_bytes


@pytest.mark.parametrize("value", [b"", b"\x00", bytes(range(256)), b"\xff" * 4096])
def test_vector_bytes_reads_back_what_the_vector_holds(value: bytes) -> None:
    vector = PyKCS11.ckbytelist(value)
    assert vector_bytes(vector) == bytes(vector) == value


def test_this_platform_reads_vectors_directly() -> None:
    # If this fails, vector_bytes fell back to bytes(): correct, ~45 us slower per signature.
    assert vector_bytes is _read_vector


def test_a_vector_sized_then_shrunk_reads_its_current_length() -> None:
    vector = PyKCS11.ckbytelist([0] * 72)  # a signature buffer sized from the key...
    vector.resize(70)  # ...that the module filled with fewer bytes (DER, or a short ECDSA)
    assert vector_bytes(vector) == bytes(70)
