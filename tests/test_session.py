"""The session model: the ticket in the cookie, the sealed record in the store, refresh and TTL."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.crypto import KeyRing, OpenError, b64u_decode, b64u_encode
from gateway.session import SESSION_PURPOSE, Identity, Session, Ticket, Tokens
from tests.support.spy import record_first_args

RING = KeyRing([bytes(range(32))])
OTHER_RING = KeyRing([bytes(range(100, 132))])
NOW = 1_700_000_000.0
ACCESS = "access-token-6b1e0c9d"
REFRESH = "refresh-token-2f8a4e71"
ID_TOKEN = "eyJhbGciOiJSUzI1NiJ9.id-token-payload.signature"


def make_session(
    *,
    expires_in: float | None = 300.0,
    refresh: str | None = REFRESH,
    refresh_expires_at: float | None = None,
    lifetime: float = 7 * 86400.0,
) -> Session:
    return Session(
        session_id="ab" * 16,
        identity=Identity(
            sub="alice",
            claims={"email": "alice@example.com", "groups": ["admins", "staff"], "name": "Alice"},
        ),
        tokens=Tokens(
            access_token=ACCESS,
            refresh_token=refresh,
            id_token=ID_TOKEN,
            expires_at=NOW + expires_in if expires_in is not None else None,
            refresh_expires_at=refresh_expires_at,
            scope=("openid", "email"),
        ),
        created_at=NOW,
        expires_at=NOW + lifetime,
        provider_sid="sid-1",
    )


# -- the ticket in the cookie ------------------------------------------------------------------


def test_ticket_cookie_round_trip() -> None:
    ticket = Ticket.new()
    cookie = ticket.to_cookie(RING)
    assert Ticket.from_cookie(cookie, RING) == ticket


def test_tickets_are_fresh() -> None:
    tickets = [Ticket.new() for _ in range(20)]
    assert len({t.session_id for t in tickets}) == 20
    assert len({t.key for t in tickets}) == 20
    assert all(len(t.session_id) == 16 and len(t.key) == 32 for t in tickets)


@pytest.mark.parametrize("index", [0, 5, 20, -1])
def test_ticket_flipped_byte_refused(index: int) -> None:
    raw = bytearray(b64u_decode(Ticket.new().to_cookie(RING)))
    raw[index] ^= 0x80
    with pytest.raises(OpenError):
        Ticket.from_cookie(b64u_encode(bytes(raw)), RING)


def test_ticket_from_another_ring_refused() -> None:
    cookie = Ticket.new().to_cookie(OTHER_RING)
    with pytest.raises(OpenError):
        Ticket.from_cookie(cookie, RING)


def test_ticket_rotation_keeps_old_cookies() -> None:
    cookie = Ticket.new().to_cookie(OTHER_RING)
    rotated = KeyRing([bytes(range(32)), bytes(range(100, 132))])
    assert Ticket.from_cookie(cookie, rotated).key


def test_ticket_of_wrong_length_refused() -> None:
    # Sealed with the right key and purpose but not a ticket's 48 bytes.
    with pytest.raises(OpenError):
        Ticket.from_cookie(RING.seal_text(b"x" * 47, SESSION_PURPOSE), RING)


def test_other_purpose_is_not_a_ticket() -> None:
    raw = Ticket.new()
    sealed = RING.seal_text(raw.session_id + raw.key, b"gateway-login-state")
    with pytest.raises(OpenError):
        Ticket.from_cookie(sealed, RING)


@pytest.mark.parametrize("value", ["", "garbage", "A" * 64 * 1024, "é", "a b"])
def test_junk_cookies_refused(value: str) -> None:
    with pytest.raises(OpenError):
        Ticket.from_cookie(value, RING)


def test_store_key_derives_from_the_id_alone() -> None:
    ticket = Ticket.new()
    same_id = Ticket(ticket.session_id, bytes(32))
    assert ticket.store_key == same_id.store_key
    assert Ticket.new().store_key != ticket.store_key
    cookie = ticket.to_cookie(RING)
    key = ticket.store_key
    assert len(key) == 64
    for shown in (
        cookie,
        ticket.id_hex,
        ticket.key.hex(),
        b64u_encode(ticket.session_id),
        b64u_encode(ticket.key),
    ):
        assert key not in shown
        assert shown not in key
    assert ticket.id_hex not in cookie


# -- the sealed record in the store ------------------------------------------------------------


def test_record_round_trip() -> None:
    ticket = Ticket.new()
    session = make_session()
    assert ticket.open_record(ticket.seal_record(session)) == session


def test_record_round_trip_without_optional_fields() -> None:
    ticket = Ticket.new()
    session = dataclasses.replace(
        make_session(expires_in=None, refresh=None),
        provider_sid=None,
        tokens=Tokens(access_token=ACCESS),
    )
    assert ticket.open_record(ticket.seal_record(session)) == session


def test_record_needs_its_own_ticket() -> None:
    ticket = Ticket.new()
    sealed = ticket.seal_record(make_session())
    with pytest.raises(OpenError):
        Ticket.new().open_record(sealed)
    # Same key, other session id: the record is bound to its id too.
    with pytest.raises(OpenError):
        Ticket(Ticket.new().session_id, ticket.key).open_record(sealed)


def test_record_flipped_byte_refused() -> None:
    ticket = Ticket.new()
    sealed = bytearray(ticket.seal_record(make_session()))
    sealed[-3] ^= 0x10
    with pytest.raises(OpenError):
        ticket.open_record(bytes(sealed))


def test_sealed_record_reveals_no_token() -> None:
    ticket = Ticket.new()
    sealed = ticket.seal_record(make_session())
    for text in (ACCESS, REFRESH, ID_TOKEN, "alice@example.com", "alice", "admins"):
        assert text.encode() not in sealed
    assert b"access_token" not in sealed


# -- refresh timing and TTL ----------------------------------------------------------------------


def test_needs_refresh_with_skew() -> None:
    session = make_session(expires_in=300.0)
    assert not session.needs_refresh(NOW, skew=60)
    assert not session.needs_refresh(NOW + 239, skew=60)
    assert session.needs_refresh(NOW + 240, skew=60)
    assert session.needs_refresh(NOW + 400, skew=60)
    assert session.needs_refresh(NOW, skew=300)
    assert not session.needs_refresh(NOW + 299, skew=0)


def test_no_expiry_never_needs_refresh() -> None:
    session = make_session(expires_in=None)
    assert not session.needs_refresh(NOW + 10**9, skew=60)
    assert session.access_token_valid(NOW + 10**9)


def test_access_token_valid() -> None:
    session = make_session(expires_in=300.0)
    assert session.access_token_valid(NOW + 299)
    assert not session.access_token_valid(NOW + 300)


def test_ttl_is_the_idle_timeout_when_that_ends_first() -> None:
    assert make_session().ttl(NOW, idle_timeout=3600) == 3600


def test_ttl_is_capped_by_the_absolute_end() -> None:
    session = make_session(lifetime=1000.0)
    assert session.ttl(NOW, idle_timeout=3600) == 1000
    assert session.ttl(NOW + 900, idle_timeout=3600) == 100
    assert session.ttl(NOW + 2000, idle_timeout=3600) == 0


def test_ttl_is_capped_by_the_refresh_token_expiry() -> None:
    session = make_session(refresh_expires_at=NOW + 500)
    assert session.ttl(NOW, idle_timeout=3600) == 500
    assert session.ttl(NOW + 600, idle_timeout=3600) == 0
    # Without a refresh token its expiry does not limit the session.
    no_refresh = make_session(refresh=None, refresh_expires_at=NOW + 500)
    assert no_refresh.ttl(NOW, idle_timeout=3600) == 3600


def test_with_tokens_bumps_version() -> None:
    session = make_session()
    new_tokens = Tokens(access_token="new-access", expires_at=NOW + 900)
    updated = session.with_tokens(new_tokens, session.identity, NOW + 10)
    assert updated.tokens is new_tokens
    assert updated.refreshed_at == NOW + 10
    assert updated.version == session.version + 1
    assert updated.session_id == session.session_id


def test_identity_claims() -> None:
    ident = Identity(sub="u1", claims={"email": "u1@example.com", "groups": ["a", 2]})
    assert ident.claim("sub") == "u1"
    assert ident.email == "u1@example.com"
    assert ident.groups == ("a", "2")
    assert Identity(sub="u", claims={"groups": "solo"}).groups == ("solo",)
    assert Identity(sub="u", claims={"groups": {"x": 1}, "email": 5}).groups == ()
    assert Identity(sub="u", claims={"email": 5}).email is None


def test_store_key_is_worked_out_once_per_ticket(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from gateway import session as session_module

    ticket = Ticket.new()
    want = hashlib.sha256(b"gateway-store-key\x00" + ticket.session_id).hexdigest()
    hashed = record_first_args(monkeypatch, session_module.hashlib, "sha256")
    again = Ticket(ticket.session_id, ticket.key)
    assert [again.store_key for _ in range(3)] == [want] * 3
    assert len(hashed) == 1
    assert again == ticket  # the kept key takes no part in equality
