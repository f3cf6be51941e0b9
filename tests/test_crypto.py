"""AEAD seal/open with a key ring, PKCE S256 (RFC 7636), random tokens, secrets."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.crypto import (
    MAX_SEALED_LEN,
    Aead,
    KeyRing,
    OpenError,
    b64u_decode,
    b64u_encode,
    constant_time_equal,
    decode_secret,
    new_secret,
    pkce_pair,
    random_token,
    sha256_b64u,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
PURPOSE = b"test-purpose"
UNRESERVED = re.compile(r"^[A-Za-z0-9\-._~]+$")  # RFC 7636 §4.1


def flip(text: str, index: int) -> str:
    """The sealed text with one byte of its decoded form changed."""
    raw = bytearray(b64u_decode(text))
    raw[index] ^= 0x01
    return b64u_encode(bytes(raw))


def test_round_trip() -> None:
    ring = KeyRing([KEY_A])
    for plaintext in (b"", b"x", b"hello world" * 100, bytes(range(256))):
        sealed = ring.seal_text(plaintext, PURPOSE)
        assert ring.open_text(sealed, PURPOSE) == plaintext


def test_sealed_text_is_base64url_and_hides_the_plaintext() -> None:
    ring = KeyRing([KEY_A])
    sealed = ring.seal_text(b"secret-plaintext", PURPOSE)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", sealed)
    assert b"secret-plaintext" not in b64u_decode(sealed)


def test_same_plaintext_seals_differently_each_time() -> None:
    ring = KeyRing([KEY_A])
    assert ring.seal_text(b"same", PURPOSE) != ring.seal_text(b"same", PURPOSE)


@pytest.mark.parametrize("index", [0, 1, 12, 13, -1])
def test_flipped_byte_refused(index: int) -> None:
    ring = KeyRing([KEY_A])
    sealed = ring.seal_text(b"payload", PURPOSE)
    with pytest.raises(OpenError):
        ring.open_text(flip(sealed, index), PURPOSE)


def test_other_key_refused() -> None:
    sealed = KeyRing([KEY_A]).seal_text(b"payload", PURPOSE)
    with pytest.raises(OpenError):
        KeyRing([KEY_B]).open_text(sealed, PURPOSE)


def test_other_purpose_refused() -> None:
    ring = KeyRing([KEY_A])
    sealed = ring.seal_text(b"payload", b"login-state")
    with pytest.raises(OpenError):
        ring.open_text(sealed, b"session-ticket")


@pytest.mark.parametrize("keep", [0, 1, 10, 28, -1])
def test_truncated_refused(keep: int) -> None:
    ring = KeyRing([KEY_A])
    raw = b64u_decode(ring.seal_text(b"payload", PURPOSE))
    cut = raw[:keep]
    with pytest.raises(OpenError):
        ring.open_text(b64u_encode(cut), PURPOSE)


def test_oversize_refused_before_any_work() -> None:
    ring = KeyRing([KEY_A])
    sealed = ring.seal_text(b"x" * 3500, PURPOSE)
    assert len(sealed) > MAX_SEALED_LEN
    with pytest.raises(OpenError, match="too long"):
        ring.open_text(sealed, PURPOSE)
    with pytest.raises(OpenError):
        ring.open_text("A" * (64 * 1024), PURPOSE)


@pytest.mark.parametrize(
    "text", ["", "not base64!", "abc=", "a+b/c", "é" * 40, "AAAA AAAA", "A", "\x00" * 30]
)
def test_non_base64_refused(text: str) -> None:
    with pytest.raises(OpenError):
        KeyRing([KEY_A]).open_text(text, PURPOSE)


def test_unknown_version_byte_refused() -> None:
    ring = KeyRing([KEY_A])
    raw = bytearray(b64u_decode(ring.seal_text(b"payload", PURPOSE)))
    raw[0] = 0x02
    with pytest.raises(OpenError):
        ring.open_text(b64u_encode(bytes(raw)), PURPOSE)


def test_key_rotation_old_key_opens_new_key_seals() -> None:
    old_ring = KeyRing([KEY_A])
    sealed_before = old_ring.seal_text(b"before rotation", PURPOSE)
    rotated = KeyRing([KEY_B, KEY_A])
    assert rotated.open_text(sealed_before, PURPOSE) == b"before rotation"
    sealed_after = rotated.seal_text(b"after rotation", PURPOSE)
    assert KeyRing([KEY_B]).open_text(sealed_after, PURPOSE) == b"after rotation"
    with pytest.raises(OpenError):
        old_ring.open_text(sealed_after, PURPOSE)
    # Once the old key is dropped, what it sealed no longer opens.
    with pytest.raises(OpenError):
        KeyRing([KEY_B]).open_text(sealed_before, PURPOSE)


def test_key_ring_and_aead_refuse_bad_keys() -> None:
    with pytest.raises(ValueError):
        KeyRing([])
    with pytest.raises(ValueError):
        Aead(b"short")


def test_aead_bytes_round_trip_and_malformed() -> None:
    aead = Aead(KEY_A)
    sealed = aead.seal(b"data", PURPOSE)
    assert aead.open(sealed, PURPOSE) == b"data"
    with pytest.raises(OpenError):
        aead.open(sealed[:20], PURPOSE)


# -- PKCE (RFC 7636) ------------------------------------------------------------------------


def test_rfc7636_appendix_b_vector() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert sha256_b64u(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_pkce_pair_shape() -> None:
    verifier, challenge = pkce_pair()
    assert len(verifier) == 43  # RFC 7636 §4.1: 43..128 characters
    assert UNRESERVED.match(verifier)
    assert len(challenge) == 43
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    assert challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert "=" not in challenge


def test_pkce_fresh_each_call() -> None:
    pairs = [pkce_pair() for _ in range(50)]
    assert len({v for v, _ in pairs}) == 50
    assert len({c for _, c in pairs}) == 50


# -- other helpers --------------------------------------------------------------------------


def test_random_token() -> None:
    tokens = {random_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) == 43 and UNRESERVED.match(t) for t in tokens)
    assert len(random_token(16)) == 22


def test_b64u_round_trip_and_rejects_padding() -> None:
    for n in range(0, 40):
        data = bytes(range(n))
        text = b64u_encode(data)
        assert "=" not in text
        if n:
            assert b64u_decode(text) == data
    with pytest.raises(ValueError):
        b64u_decode("")
    with pytest.raises(ValueError):
        b64u_decode("ab+/")


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ab+/",
        "abc=",
        "abcd\n",  # a trailing newline (what a "$"-anchored check would let through)
        "\nabcd",
        "ab cd",
        "ab\x00d",
        "\u0663\u0663\u0663\u0663",  # Arabic-Indic digits: digits to str.isdigit, not base64
        "\uff21\uff21\uff21\uff21",  # fullwidth A
        "\u00e9" * 4,
        "A",  # one character more than a whole group: no bytes end there
        "AAAAA",
    ],
)
def test_b64u_decode_refuses_anything_but_unpadded_base64url(text: str) -> None:
    with pytest.raises(ValueError):
        b64u_decode(text)


@given(st.text(alphabet=_ALPHABET + "=+/ \n.\u0663\uff21", max_size=24))
def test_b64u_decode_accepts_exactly_the_url_alphabet(text: str) -> None:
    """Accepted iff every character is of the URL alphabet and the length can end a group;
    then it decodes as the standard library does."""
    valid = bool(text) and all(c in _ALPHABET for c in text) and len(text) % 4 != 1
    if valid:
        assert b64u_decode(text) == base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    else:
        with pytest.raises(ValueError):
            b64u_decode(text)


def test_constant_time_equal() -> None:
    assert constant_time_equal("abc", "abc")
    assert constant_time_equal(b"abc", "abc")
    assert not constant_time_equal("abc", "abd")
    assert not constant_time_equal("abc", "abcd")


def test_new_secret_decodes_to_32_bytes() -> None:
    secrets = {new_secret() for _ in range(20)}
    assert len(secrets) == 20
    for s in secrets:
        assert len(s) == 44
        assert len(decode_secret(s)) == 32
        assert decode_secret(s) == base64.urlsafe_b64decode(s)
    # The standard alphabet works too (operators paste `openssl rand -base64 32`).
    raw = bytes(range(200, 232))
    assert decode_secret(base64.b64encode(raw).decode()) == raw
    assert decode_secret(base64.b64encode(raw).decode().rstrip("=")) == raw
