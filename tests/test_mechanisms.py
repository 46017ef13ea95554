"""Every mechanism, on two PKCS#11 implementations (SoftHSM2 and opencryptoki, in-process),
checked by ``cryptography``; what a token lacks is skipped with the token's own refusal."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding, aes_key_wrap_with_padding
from cryptography.hazmat.primitives.padding import PKCS7
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from p11guard import MechanismUnsupported, RequestError, UserError
from p11guard.protocol import MECHANISMS, mechanisms_for
from p11guard.testbed import Testbed
from tokens import BACKENDS, KEK, KEK_LABEL, Token, open_token


@pytest.fixture(scope="module", params=BACKENDS)
def token(
    request: pytest.FixtureRequest, hsm_testbeds: Callable[..., Testbed], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Token]:
    yield from open_token(request.param, hsm_testbeds, tmp_path_factory.mktemp("token"))


def _lacks(token: Token, call: Callable[[], object], name: str) -> None:
    """``call`` is refused because the token lacks ``name``: check the refusal is the
    token's answer naming it and the alternatives, then skip with it as the reason."""
    with pytest.raises(MechanismUnsupported) as info:
        call()
    message = info.value.message
    assert repr(name) in message and repr(token.config.token_label) in message and "instead" in message, message
    pytest.skip(f"{token.backend}: {message}")


_HASH = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
_SIGN_KEYS = {
    "ecdsa-sha256": "m-ec256",
    "ecdsa-sha384": "m-ec384",
    "ecdsa-sha512": "m-ec521",
    "rsa-pkcs1-sha256": "m-rsa2048",
    "rsa-pkcs1-sha384": "m-rsa4096",
    "rsa-pkcs1-sha512": "m-rsa2048",
    "rsa-pss-sha256": "m-rsa2048",
    "rsa-pss-sha384": "m-rsa2048",
    "rsa-pss-sha512": "m-rsa4096",
    "ed25519": "m-ed",
}


def check_signature(pem: bytes, mechanism: str, signature: bytes, data: bytes, prehashed: bool = False) -> None:
    """``cryptography`` verifies it (raises if not)."""
    public = load_pem_public_key(pem)
    digest = MECHANISMS[mechanism].digest
    algorithm = _HASH[digest] if digest else None
    if prehashed:
        assert algorithm is not None
        data, algorithm = hashlib.new(algorithm.name, data).digest(), Prehashed(algorithm)
    if mechanism.startswith("ecdsa-"):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, data, ec.ECDSA(algorithm))  # type: ignore[arg-type]
    elif mechanism.startswith("rsa-pkcs1-"):
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, data, padding.PKCS1v15(), algorithm)  # type: ignore[arg-type]
    elif mechanism.startswith("rsa-pss-"):
        assert isinstance(public, rsa.RSAPublicKey) and digest is not None
        pss = padding.PSS(padding.MGF1(_HASH[digest]), _HASH[digest].digest_size)
        public.verify(signature, data, pss, algorithm)  # type: ignore[arg-type]
    else:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, data)


def test_the_table_names_every_mechanism_and_the_choice(token: Token) -> None:
    assert set(token.table) == set(MECHANISMS)
    for name, entry in token.table.items():
        assert (entry["via"] is None) == (not entry["uses"]), (name, entry)
        assert entry["via"] is not None or entry["needs"], (name, entry)
    if token.backend == "opencryptoki":  # no CKM_SHA256_RSA_PKCS: raw RSA, hashed in the host
        assert token.table["rsa-pkcs1-sha256"] == {
            **token.table["rsa-pkcs1-sha256"],
            "via": "CKM_RSA_PKCS",
            "hash": "host",
        }
        assert token.table["rsa-pss-sha256"]["via"] == "CKM_SHA256_RSA_PKCS_PSS"
        assert token.table["ecdsa-sha256"]["needs"] == ["CKM_ECDSA_SHA256", "CKM_ECDSA"]
    else:  # SoftHSM2: raw ECDSA only, combined RSA
        assert token.table["ecdsa-sha384"] == {**token.table["ecdsa-sha384"], "via": "CKM_ECDSA", "hash": "host"}
        assert token.table["rsa-pkcs1-sha512"] == {**token.table["rsa-pkcs1-sha512"], "hash": "token"}


@pytest.mark.parametrize("mechanism", list(_SIGN_KEYS))
def test_sign_and_sign_digest_verify_with_cryptography(token: Token, mechanism: str) -> None:
    data = b"a record for " + mechanism.encode()
    key = _SIGN_KEYS[mechanism]
    if not token.offers(mechanism, "sign"):
        _lacks(token, lambda: token.call("sign", key=key, data=data, mechanism=mechanism), mechanism)
    key = token.key(key)
    pem = token.call("public_key", key=key)
    signature = token.call("sign", key=key, data=data, mechanism=mechanism)
    check_signature(pem, mechanism, signature, data)
    assert token.call("verify", key=key, data=data, signature=signature, mechanism=mechanism)
    assert not token.call("verify", key=key, data=data + b"!", signature=signature, mechanism=mechanism)
    digest_name = MECHANISMS[mechanism].digest
    if digest_name is None:
        with pytest.raises(RequestError, match="cannot sign a pre-computed digest"):
            token.call("sign_digest", key=key, digest=bytes(32), mechanism=mechanism)
        return
    digest = hashlib.new(digest_name, data).digest()
    signature = token.call("sign_digest", key=key, digest=digest, mechanism=mechanism)
    check_signature(pem, mechanism, signature, data)
    check_signature(pem, mechanism, signature, data, prehashed=True)
    assert token.call("verify", key=key, digest=digest, signature=signature, mechanism=mechanism)
    with pytest.raises(UserError, match=rf"{digest_name.upper()} digest of {len(digest)} bytes, not 20") as info:
        token.call("sign_digest", key=key, digest=bytes(20), mechanism=mechanism)
    assert info.value.name == "digest_length"


@pytest.mark.parametrize("mechanism", ["hmac-sha256", "hmac-sha384", "hmac-sha512"])
def test_hmac_matches_python(token: Token, mechanism: str) -> None:
    digest = mechanism[5:]
    value = os.urandom(64)
    label = token.known_secret(f"m-known-{mechanism}-{value.hex()[:8]}", "hmac-sha512", value)
    mac = token.call("sign", key=label, data=b"message", mechanism=mechanism)
    assert mac == hmac.new(value, b"message", digest).digest()
    assert token.call("verify", key=label, data=b"message", signature=mac, mechanism=mechanism)
    generated = token.key("m-hmac384")  # a generated key of 48 bytes fits hmac-sha384 and -256, not -512
    if mechanism != "hmac-sha512":
        assert len(token.call("sign", key=generated, data=b"m", mechanism=mechanism)) == len(mac)
    else:
        with pytest.raises(UserError, match="does not fit a hmac-sha384 key"):
            token.call("sign", key=generated, data=b"m", mechanism=mechanism)


@pytest.mark.parametrize("mechanism", ["aes-gcm", "aes-cbc-pad"])
def test_aes_both_ways_with_cryptography(token: Token, mechanism: str) -> None:
    if not token.offers(mechanism, "encrypt"):
        _lacks(token, lambda: token.call("encrypt", key=KEK_LABEL, data=b"x", mechanism=mechanism), mechanism)
    data = b"plain text, not a multiple of the block"
    aad = {"aad": b"header"} if mechanism == "aes-gcm" else {}
    out = token.call("encrypt", key=KEK_LABEL, data=data, mechanism=mechanism, **aad)
    if mechanism == "aes-gcm":
        assert AESGCM(KEK).decrypt(out[:12], out[12:], b"header") == data
        iv = os.urandom(12)
        theirs = iv + AESGCM(KEK).encrypt(iv, data, b"header")
    else:
        decryptor = Cipher(algorithms.AES(KEK), modes.CBC(out[:16])).decryptor()
        unpadder = PKCS7(128).unpadder()
        assert unpadder.update(decryptor.update(out[16:]) + decryptor.finalize()) + unpadder.finalize() == data
        iv, padder = os.urandom(16), PKCS7(128).padder()
        encryptor = Cipher(algorithms.AES(KEK), modes.CBC(iv)).encryptor()
        theirs = iv + encryptor.update(padder.update(data) + padder.finalize()) + encryptor.finalize()
    assert token.call("decrypt", key=KEK_LABEL, data=theirs, mechanism=mechanism, **aad) == data
    for label in ("m-aes128", "m-aes256"):  # generated keys of both sizes round-trip
        ct = token.call("encrypt", key=token.key(label), data=data, mechanism=mechanism, **aad)
        assert token.call("decrypt", key=label, data=ct, mechanism=mechanism, **aad) == data
    if mechanism == "aes-gcm":
        with pytest.raises(UserError) as info:
            token.call("decrypt", key=KEK_LABEL, data=out, mechanism=mechanism, aad=b"other")
        assert info.value.name == "decrypt_failed"


def test_rsa_oaep_both_ways(token: Token) -> None:
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    call = lambda: token.call("encrypt", key="m-rsa2048", data=b"secret", mechanism="rsa-oaep-sha256")  # noqa: E731
    if not token.offers("rsa-oaep-sha256", "encrypt"):
        _lacks(token, call, "rsa-oaep-sha256")
    try:
        ct = call()
    except MechanismUnsupported as exc:  # listed, refused with these parameters (SoftHSM2 2.6: SHA-1 only)
        assert "CKM_RSA_PKCS_OAEP" in exc.message and "refused" in exc.message
        assert token.call("mechanisms")["mechanisms"]["rsa-oaep-sha256"]["refused"]
        _lacks(token, call, "rsa-oaep-sha256")
    assert token.call("decrypt", key="m-rsa2048", data=ct, mechanism="rsa-oaep-sha256") == b"secret"
    public = load_pem_public_key(token.call("public_key", key="m-rsa2048"))
    theirs = public.encrypt(b"from cryptography", oaep)  # type: ignore[union-attr]
    assert token.call("decrypt", key="m-rsa2048", data=theirs, mechanism="rsa-oaep-sha256") == b"from cryptography"


@pytest.mark.parametrize("mechanism", ["aes-key-wrap-pad", "rsa-oaep-sha256"])
def test_wrap_and_unwrap(token: Token, mechanism: str) -> None:
    wrapping = KEK_LABEL if mechanism.startswith("aes") else "m-rsa2048"
    suffix = f"{mechanism}-{os.urandom(4).hex()}"
    target = token.call("generate_secret", label=f"m-target-{suffix}", type="aes-256", extractable=True)["label"]
    call = lambda: token.call("wrap", key=wrapping, target=target, mechanism=mechanism)  # noqa: E731
    if not token.offers(mechanism, "wrap"):
        _lacks(token, call, mechanism)
    try:
        wrapped = call()
    except MechanismUnsupported:
        _lacks(token, call, mechanism)
    unwrapped = token.call(
        "unwrap", key=wrapping, wrapped=wrapped, label=f"m-copy-{suffix}", type="aes-256", mechanism=mechanism
    )
    ct = token.call("encrypt", key=unwrapped["label"], data=b"same key", mechanism="aes-cbc-pad")
    assert token.call("decrypt", key=target, data=ct, mechanism="aes-cbc-pad") == b"same key"
    value = os.urandom(32)  # a key of known value: cryptography wraps it, the token unwraps it
    if mechanism.startswith("aes"):
        assert len(aes_key_unwrap_with_padding(KEK, wrapped)) == 32
        theirs = aes_key_wrap_with_padding(KEK, value)
    else:
        public = load_pem_public_key(token.call("public_key", key="m-rsa2048"))
        theirs = public.encrypt(value, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))  # type: ignore[union-attr]
    known = token.call(
        "unwrap", key=wrapping, wrapped=theirs, label=f"m-known-{suffix}", type="aes-256", mechanism=mechanism
    )
    out = token.call("encrypt", key=known["label"], data=b"known", mechanism="aes-cbc-pad")
    decryptor = Cipher(algorithms.AES(value), modes.CBC(out[:16])).decryptor()
    assert (decryptor.update(out[16:]) + decryptor.finalize())[:5] == b"known"
    assert known["type"] in ("aes-256", "aes")  # SoftHSM2 records no CKA_VALUE_LEN for an unwrapped key


@pytest.mark.parametrize(("key", "curve"), [("m-ec256", ec.SECP256R1()), ("m-ec384", ec.SECP384R1())])
def test_ecdh_derives_the_shared_key(token: Token, key: str, curve: ec.EllipticCurve) -> None:
    peer = ec.generate_private_key(curve)
    pem = peer.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    label = f"m-derived-{key}-{os.urandom(4).hex()}"
    if not token.offers("ecdh", "derive"):
        _lacks(token, lambda: token.call("derive", key=key, peer=pem, label=label), "ecdh")
    made = token.call("derive", key=token.key(key), peer=pem, label=label, type="aes-256")
    shared = peer.exchange(ec.ECDH(), load_pem_public_key(token.call("public_key", key=key)))  # type: ignore[arg-type]
    out = token.call("encrypt", key=made["label"], data=b"agreed", mechanism="aes-cbc-pad")
    decryptor = Cipher(algorithms.AES(shared[-32:]), modes.CBC(out[:16])).decryptor()  # SoftHSM2: trailing bytes
    assert (decryptor.update(out[16:]) + decryptor.finalize())[:6] == b"agreed"
    other = (
        ec.generate_private_key(ec.SECP521R1())
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(UserError, match="not on the"):
        token.call("derive", key=key, peer=other, label=label + "-x")


def test_a_mechanism_the_token_lacks_is_refused_naming_it_and_the_alternatives(token: Token) -> None:
    lacking = [n for n in mechanisms_for("encrypt") if not token.offers(n, "encrypt")]
    if token.backend == "opencryptoki":
        assert lacking == ["aes-gcm"]
        with pytest.raises(MechanismUnsupported) as info:
            token.call("encrypt", key=KEK_LABEL, data=b"x", mechanism="aes-gcm")
        assert "'aes-gcm'" in info.value.message and "IBM" in info.value.message
        assert "instead: aes-cbc-pad, rsa-oaep-sha256" in info.value.message
        with pytest.raises(MechanismUnsupported, match="cannot generate ec-p256 keys: it lists no CKM_EC_KEY_PAIR_GEN"):
            token.call("generate_key_pair", label="m-never", type="ec-p256")
        with pytest.raises(MechanismUnsupported, match="'ecdsa-sha256' for signing.*instead: rsa-pkcs1-sha256"):
            token.call("sign", key="m-rsa2048", data=b"x", mechanism="ecdsa-sha256")
    else:
        assert lacking == []
    with pytest.raises(UserError, match="does not fit a aes-256 key") as mismatch:
        token.call("sign", key="m-aes256", data=b"x", mechanism="hmac-sha256")
    assert mismatch.value.name == "mechanism_mismatch"
    with pytest.raises(UserError, match=r"no secret key labelled 'm-rsa2048' \(it names a private key, public key"):
        token.call("sign", key="m-rsa2048", data=b"x", mechanism="hmac-sha256")


def test_keys_by_uri_and_id(token: Token) -> None:
    info = token.call("key_info", key="m-rsa2048")
    assert info["type"] == "rsa-2048" and {"private key", "public key"} <= set(info["classes"])
    by_id = "pkcs11:id=" + "".join(f"%{b:02x}" for b in bytes.fromhex(info["id"]))
    uri = f"pkcs11:token={token.config.token_label};object=m-rsa2048;type=private"
    pem = token.call("public_key", key="m-rsa2048")
    for name in (by_id, uri, by_id + ";type=public"):
        signature = token.call("sign", key=name, data=b"by uri", mechanism="rsa-pss-sha256")
        check_signature(pem, "rsa-pss-sha256", signature, b"by uri")
        assert token.call("key_info", key=name)["label"] == "m-rsa2048"
    with pytest.raises(UserError, match=r"names token='elsewhere'.*config group.token_label") as info_:
        token.call("sign", key="pkcs11:token=elsewhere;object=m-rsa2048", data=b"x", mechanism="rsa-pss-sha256")
    assert info_.value.name == "key_token_mismatch"
    for bad, why in (
        ("pkcs11:object=m-rsa2048;pin-value=1234", "holds a PIN"),
        ("pkcs11:id=%zz", "two hex digits"),
        ("pkcs11:type=private", "names no key"),
        ("pkcs11:object=x;colour=blue", "unknown attribute 'colour'"),
    ):
        with pytest.raises(RequestError, match=why):
            token.call("sign", key=bad, data=b"x", mechanism="rsa-pss-sha256")
    with pytest.raises(UserError, match="no private key matching 'pkcs11:id=%ff%ff%ff'"):
        token.call("sign", key="pkcs11:id=%ff%ff%ff", data=b"x", mechanism="rsa-pss-sha256")


def test_an_operation_left_active_renews_the_session_not_a_loss(token: Token) -> None:
    before = token.call("ping")
    token.call("fault", action="leave_active", key="m-rsa2048", mechanism="rsa-pkcs1-sha256")
    signature = token.call("sign", key="m-rsa2048", data=b"after", mechanism="rsa-pkcs1-sha256")
    check_signature(token.call("public_key", key="m-rsa2048"), "rsa-pkcs1-sha256", signature, b"after")
    after = token.call("ping")
    assert after["renewals"] == before["renewals"] + 1 and after["login_attempts"] == before["login_attempts"]
    if token.backend == "softhsm":  # SoftHSM2 refuses C_FindObjectsInit too; opencryptoki keeps them apart
        token.call("fault", action="leave_active", key="m-rsa2048", mechanism="rsa-pkcs1-sha256")
        with pytest.raises(UserError, match="not run again because it changes the token") as info:  # never blindly
            token.call("generate_secret", label=f"m-never-{os.urandom(4).hex()}", type="aes-128")
        assert info.value.ckr == 0x90
        assert token.call("random", n=4)
