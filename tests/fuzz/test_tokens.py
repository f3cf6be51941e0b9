"""Fuzz bearer tokens (JWT-shaped and opaque) on an ``accept_bearer`` route, and back-channel
logout tokens.

Three kinds of input: random text and random JWT-shaped tokens; real tokens (a JWT access
token and an opaque one the provider knows) damaged; and tokens signed with the provider's
own key whose header and claims are fuzzed, so the validation of every claim is exercised
behind a good signature.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.crypto import b64u_decode
from tests.conftest import CLIENT_ID
from tests.fuzz.profiles import FUZZ
from tests.fuzz.properties import (
    USERS,
    answered_oversized,
    check_all,
    json_values,
    jwt_shaped,
    mutated,
    norm,
)
from tests.fuzz.stack import COOKIE, FuzzStack, Reply

pytestmark = pytest.mark.fuzz

API = [("Accept", "application/json")]
LOGOUT = "/oauth2/backchannel_logout"
_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def bearer(stack: FuzzStack, token: str, path: str = "/api/x", scheme: str = "Bearer") -> Reply:
    return stack.request(
        "GET", path, headers=[*API, ("Authorization", f"{scheme} {token}")], count="bearer"
    )


def upstream_identity(reply: Reply) -> dict[str, str]:
    return {norm(n): v for n, v in reply.upstream() or [] if norm(n).startswith("x-forwarded-")
            and norm(n) not in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")}  # fmt: skip


def same_jwt(a: str, b: str) -> bool:
    """Whether two compact JWS carry the same three decoded parts."""
    pa, pb = a.split("."), b.split(".")
    if len(pa) != 3 or len(pb) != 3:
        return False
    try:
        return all(b64u_decode(x) == b64u_decode(y) for x, y in zip(pa, pb, strict=True) if x or y)
    except ValueError:
        return False


def accepted(stack: FuzzStack, token: str, real: str) -> bool:
    """Whether the gateway must accept this token: a compact JWS it validates itself is good
    when it carries the real token's bytes; anything else is the provider's to say (RFC 7662),
    and the dev provider is lenient (its JWT library reads padded base64, say)."""
    assert stack.idp is not None
    if len(token) > 16384 or not re.fullmatch(r"[A-Za-z0-9\-._~+/]+=*", token):
        return False  # not an RFC 6750 b64token: refused before anyone is asked
    if re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*", token):
        return same_jwt(token, real)
    return stack.idp.state.active_access_token(token) is not None


tokens_text = st.one_of(
    st.text(alphabet="ABCxyz019-._~+/=", min_size=1, max_size=60),
    st.text(alphabet=_PRINTABLE, max_size=40),
    st.builds(
        jwt_shaped,
        st.one_of(
            json_values(),
            st.fixed_dictionaries(
                {
                    "alg": st.sampled_from(
                        ["none", "None", "RS256", "HS256", "ES256", "PS256", "EdDSA", ""]
                    )
                },
                optional={
                    "kid": json_values(3),
                    "typ": json_values(2),
                    "crit": json_values(3),
                    "jku": st.just("http://127.0.0.1:1/jwks"),
                    "b64": st.booleans(),
                },
            ),
        ),
        st.one_of(json_values(), st.just({"sub": "alice", "aud": CLIENT_ID})),
        st.binary(max_size=64),
    ),
)


@FUZZ
@given(
    token=tokens_text, scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "Bearer ", "Basic"])
)
def test_random_and_jwt_shaped_tokens_are_refused(
    fuzz_stack: FuzzStack, token: str, scheme: str
) -> None:
    reply = bearer(fuzz_stack, token, scheme=scheme)
    check_all(fuzz_stack, reply)
    if scheme.strip().lower() != "bearer" or not token.strip():
        # Not a bearer credential at all: the API route answers 401 for the missing session.
        assert reply.status == 401 or (scheme == "Bearer " and reply.status in (400, 401))
        return
    assert reply.status in (400, 401), f"{reply.status}: {reply.text[:200]}"
    assert not upstream_identity(reply)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["jwt", "opaque"]))
def test_damaged_real_tokens_open_nothing(
    fuzz_stack: FuzzStack, data: st.DataObject, kind: str
) -> None:
    real = fuzz_stack.jwt_token if kind == "jwt" else fuzz_stack.opaque_token
    token = data.draw(mutated(real))
    reply = bearer(fuzz_stack, token)
    same = accepted(fuzz_stack, token, real)
    check_all(fuzz_stack, reply, identity=USERS["alice"] if same else None)
    if answered_oversized(reply):
        return
    if same:
        assert reply.status == 200, reply.text
        assert upstream_identity(reply)["x-forwarded-user"] == "alice"
    else:
        assert reply.status in (400, 401), f"{reply.status}: {reply.text[:200]}"
        assert not upstream_identity(reply)


# -- tokens with a good signature and fuzzed contents ----------------------------------------

CLAIM_NAMES = ["iss", "sub", "aud", "exp", "nbf", "iat", "scope", "scp", "typ", "nonce",
               "cnf", "events", "client_id", "azp", "groups", "email", "email_verified",
               "preferred_username", "jti", "sid"]  # fmt: skip
printable_text = st.text(alphabet=_PRINTABLE, max_size=20)


@st.composite
def fuzzed_claims(
    draw: st.DrawFn, base: dict[str, Any], values: st.SearchStrategy[Any]
) -> dict[str, Any]:
    claims = dict(base)
    for name in draw(st.lists(st.sampled_from(CLAIM_NAMES), max_size=4)):
        if draw(st.booleans()):
            claims.pop(name, None)
        else:
            claims[name] = draw(values)
    return claims


signed_headers = st.fixed_dictionaries(
    {}, optional={"typ": st.one_of(st.sampled_from(["at+jwt", "JWT", "logout+jwt", "application/at+jwt", "jwt", "x"]), json_values(2)),
                  "cty": json_values(2), "crit": json_values(2), "zip": st.just("DEF")},
)  # fmt: skip


def _plain_text(value: Any) -> bool:
    """No control character and no whitespace at the ends of any string inside (those are
    issue 7 item 7's cases, tested below)."""
    if isinstance(value, str):
        return value == value.strip() and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    if isinstance(value, list):
        return all(_plain_text(v) for v in value)
    if isinstance(value, dict):
        return all(_plain_text(k) and _plain_text(v) for k, v in value.items())
    return True


def expect_access(claims: dict[str, Any], issuer: str) -> bool:
    """Necessary conditions for an access token to be accepted (RFC 9068 §4)."""
    now = time.time()
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    exp = claims.get("exp")
    return (
        claims.get("iss") == issuer
        and CLIENT_ID in auds
        and isinstance(exp, int | float) and not isinstance(exp, bool) and exp > now - 60
        and isinstance(claims.get("sub"), str) and bool(claims["sub"])
    )  # fmt: skip


@FUZZ
@given(data=st.data(), header=signed_headers)
def test_signed_access_tokens_with_fuzzed_claims(
    fuzz_stack: FuzzStack, data: st.DataObject, header: dict[str, Any]
) -> None:
    base = fuzz_stack.access_claims("bob")
    # Text HTTP can carry as a header value as it is: no whitespace at either end (that case
    # is test_claim_values_arrive_as_signed below).
    values = st.one_of(json_values(), printable_text).filter(_plain_text)
    claims = data.draw(fuzzed_claims(base, values))
    try:
        token = fuzz_stack.sign(claims, header)
    except (TypeError, ValueError):  # not JSON-serialisable (NaN is, surprisingly)
        return
    reply = bearer(fuzz_stack, token)
    ident = upstream_identity(reply)
    check_all(fuzz_stack, reply, identity=None if reply.status != 200 else {
        "sub": claims.get("sub"), **{k: claims.get(k) for k in ("email", "groups", "preferred_username")}})  # fmt: skip
    assert fuzz_stack.idp is not None
    if reply.status == 200:
        assert expect_access(claims, fuzz_stack.idp.issuer), claims
        assert ident["x-forwarded-user"] == claims["sub"]
    else:
        assert reply.status in (400, 401, 403), f"{reply.status}: {reply.text[:200]}"


def control_text() -> st.SearchStrategy[str]:
    return st.text(alphabet=st.characters(max_codepoint=0x7F), min_size=1, max_size=12).filter(
        lambda t: any(ord(c) < 0x20 or ord(c) == 0x7F for c in t)
    )


@FUZZ
@given(
    claim=st.sampled_from(["preferred_username", "email", "groups"]),
    value=control_text(),
)
def test_a_control_character_in_a_claim_never_breaks_the_request(
    fuzz_stack: FuzzStack, claim: str, value: str
) -> None:
    claims = fuzz_stack.access_claims("bob")
    claims[claim] = [value, "staff"] if claim == "groups" else value
    reply = bearer(fuzz_stack, fuzz_stack.sign(claims, {"typ": "at+jwt"}))
    check_all(fuzz_stack, reply, identity={k: claims.get(k) for k in USERS["bob"]})
    assert reply.status == 200
    for _, sent in reply.upstream() or []:
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in sent)


@FUZZ
@given(
    claim=st.sampled_from(["sub", "preferred_username", "email"]),
    pad=st.sampled_from([" ", "  ", " x ", "x "]),
)
def test_claim_values_arrive_as_signed(fuzz_stack: FuzzStack, claim: str, pad: str) -> None:
    """A claim "alice " must not reach the upstream as "alice" (another user's name)."""
    claims = fuzz_stack.access_claims("bob")
    claims[claim] = pad.replace("x", "alice")
    reply = bearer(fuzz_stack, fuzz_stack.sign(claims, {"typ": "at+jwt"}))
    assert reply.status == 200, reply.text
    name = {"sub": "x-forwarded-user", "email": "x-forwarded-email"}.get(
        claim, "x-forwarded-preferred-username"
    )
    # Sent as signed, or encoded/dropped: never as a different plain value.
    sent = upstream_identity(reply).get(name)
    assert sent is None or sent == claims[claim] or "%" in sent, (claims[claim], sent)


@FUZZ
@given(groups=st.lists(st.text(alphabet="ab, ", min_size=1, max_size=6), min_size=1, max_size=3))
def test_list_claims_cannot_be_read_as_other_items(
    fuzz_stack: FuzzStack, groups: list[str]
) -> None:
    claims = fuzz_stack.access_claims("bob")
    claims["groups"] = groups
    reply = bearer(fuzz_stack, fuzz_stack.sign(claims, {"typ": "at+jwt"}))
    check_status_ok = reply.status == 200
    assert check_status_ok, reply.text
    sent = upstream_identity(reply).get("x-forwarded-groups", "")
    # Split at "," and percent-decoded (the documented encoding), the header gives back
    # exactly the groups: no item that is not a group, none lost.
    assert [unquote(item) for item in sent.split(",")] == groups, (groups, sent)


# -- back-channel logout tokens ---------------------------------------------------------------

form_types = st.sampled_from(["application/x-www-form-urlencoded", "multipart/form-data",
                              "application/json", "text/plain", "application/x-www-form-urlencoded; charset=latin-1"])  # fmt: skip


def sessions_alive(stack: FuzzStack) -> None:
    for user in ("alice", "bob"):
        alive = stack.request("GET", "/oauth2/userinfo", cookies={COOKIE: stack.sessions[user]})
        assert alive.status == 200, f"{user}'s session ended"


def post_logout(stack: FuzzStack, body: bytes, ctype: str) -> Reply:
    return stack.request(
        "POST", LOGOUT, data=body, headers=[("Content-Type", ctype)], count="back-channel logout"
    )


@FUZZ
@given(
    token=st.one_of(tokens_text, st.just("")),
    extra=st.lists(st.tuples(st.sampled_from(["logout_token", "x", "logout_token[]"]), st.text(max_size=10)), max_size=2),
    ctype=form_types,
    raw=st.one_of(st.none(), st.binary(max_size=60)),
)  # fmt: skip
def test_random_logout_requests_are_refused(
    fuzz_stack: FuzzStack, token: str, extra: list[tuple[str, str]], ctype: str, raw: bytes | None
) -> None:
    from urllib.parse import urlencode

    body = raw if raw is not None else urlencode([("logout_token", token), *extra]).encode()
    reply = post_logout(fuzz_stack, body, ctype)
    check_all(fuzz_stack, reply)
    assert reply.status == 400, f"{reply.status}: {reply.text[:200]}"


@FUZZ
@given(data=st.data(), header=signed_headers, damage=st.booleans())
def test_signed_logout_tokens_with_fuzzed_claims(
    fuzz_stack: FuzzStack, data: st.DataObject, header: dict[str, Any], damage: bool
) -> None:
    """Only a token for a subject nobody is signed in as is fuzzed: whatever is accepted, the
    sessions of alice and bob live on, and a refusal is a 400."""
    from urllib.parse import urlencode

    base = fuzz_stack.logout_claims()
    values = st.one_of(json_values(), printable_text).filter(lambda v: v not in ("alice", "bob"))
    claims = data.draw(fuzzed_claims(base, values))
    if claims.get("sub") in ("alice", "bob") or "sid" in claims:
        claims["sub"], claims["sid"] = "nobody-fuzz", "no-such-sid"
    try:
        token = fuzz_stack.sign(claims, header)
    except (TypeError, ValueError):
        return
    if damage:
        token = data.draw(mutated(token))
    body = urlencode({"logout_token": token}).encode()
    reply = post_logout(fuzz_stack, body, "application/x-www-form-urlencoded")
    check_all(fuzz_stack, reply)
    if len(body) > 1024 * 1024:  # over the app's client_max_size
        assert reply.status == 413, reply.status
    elif reply.status == 200:
        assert json.loads(reply.text) == {"ended": 0}
        assert not damage or "." in token
    else:
        assert reply.status == 400, f"{reply.status}: {reply.text[:200]}"
    sessions_alive(fuzz_stack)
