"""The properties every answer must have, and the strategies that generate client input.

Properties (issue 7, "Fuzzing, continuously"):

- never a 5xx (the harness never stops the store, provider or upstream);
- never a session that was not earned: no ``Set-Cookie`` of the session cookie with a value,
  and the upstream sees an identity only for a session cookie from a real login;
- never an off-origin redirect: every ``Location``, read the way a browser reads it, is on the
  gateway's origin, an allowlisted origin, or the provider's authorization / end-session
  endpoint;
- never a client-supplied identity header upstream, in any spelling.
"""

from __future__ import annotations

import base64
import json
import re

from hypothesis import assume
from hypothesis import strategies as st

from gateway.crypto import b64u_decode
from tests.fuzz.stack import ALLOWED_ORIGIN, COOKIE, FuzzStack, Reply
from tests.fuzz.urls import browser_target, origin_of

SPOOF = "spoofed-by-client"

# Every header name the gateway emits as identity, or trusts from a proxy (issue 7 item 6).
IDENTITY_NAMES = (
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Forwarded-Access-Token",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-Uri",
    "X-Forwarded-Method",
    "X-Gateway-Assertion",
    "X-Real-Ip",
    "Forwarded",
)
# Names the gateway emits in forward-auth answers or trusts from a proxy, which today reach
# the upstream (issue 7 item 6, fixed on branch sec-proxy).
EMITTED_ELSEWHERE = (
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Groups",
    "X-Auth-Request-Preferred-Username",
    "X-Original-URI",
    "X-Original-Method",
)
# The identity headers the standard routes set (tests.conftest: the defaults).
SESSION_IDENTITY = {
    "x-forwarded-user": "sub",
    "x-forwarded-email": "email",
    "x-forwarded-groups": "groups",
    "x-forwarded-preferred-username": "preferred_username",
}


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


# -- checks ---------------------------------------------------------------------------------


def check_location(stack: FuzzStack, reply: Reply) -> None:
    location = reply.headers.get("Location")
    if location is None:
        return
    target = browser_target(stack.url, location)
    allowed = {origin_of(stack.url), ALLOWED_ORIGIN}
    if origin_of(target) in allowed:
        return
    for endpoint in (stack.authorization_endpoint, stack.end_session_endpoint):
        if endpoint and target.split("?", 1)[0] == endpoint:
            return
    raise AssertionError(f"off-origin redirect {location!r} from {reply.method} {reply.url}")


def check_no_session_issued(reply: Reply) -> None:
    for name, value, _ in reply.set_cookies:
        if value and name == COOKIE:
            raise AssertionError(f"a session cookie was issued by {reply.method} {reply.url}")


def check_upstream(reply: Reply, identity: dict[str, object] | None) -> None:
    """Nothing the client sent as identity arrives; identity only as the session says."""
    seen = reply.upstream()
    if seen is None:
        return
    for name, value in seen:
        key = norm(name)
        if SPOOF in value and (
            key in {norm(n) for n in IDENTITY_NAMES} or key.startswith("x-forwarded-")
        ):
            raise AssertionError(f"client's {name} reached the upstream: {reply.url}")
        if key in SESSION_IDENTITY:
            if identity is None:
                raise AssertionError(f"identity header {name} upstream without a session")
            claim = identity.get(SESSION_IDENTITY[key])
            items = claim if isinstance(claim, list) else [claim]
            expected = ",".join(str(v) for v in items)
            # Only plain values are compared: how others are encoded is issue 7 items 7/8.
            plain = all(re.fullmatch(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?", str(v))
                        and not set(str(v)) & {",", "%"} for v in items)  # fmt: skip
            if plain and value != expected:
                raise AssertionError(f"{name}: {value!r} is not the session's {expected!r}")


def check_emitted_names(reply: Reply) -> None:
    """Issue 7 item 6: names the gateway emits elsewhere never come from the client."""
    seen = reply.upstream() or []
    for name, value in seen:
        if SPOOF in value and norm(name) in {norm(n) for n in EMITTED_ELSEWHERE}:
            raise AssertionError(f"client's {name} reached the upstream: {reply.url}")


def check_status(reply: Reply) -> None:
    assert reply.status < 500, f"{reply.status} for {reply.method} {reply.url}: {reply.text[:300]}"


def answered_oversized(reply: Reply) -> bool:
    """Whether the request was over a server limit; then it must have been a plain 400."""
    assume(reply.oversized is not None)
    if reply.oversized:
        assert reply.status == 400, reply.text
    return bool(reply.oversized)


def check_all(stack: FuzzStack, reply: Reply, identity: dict[str, object] | None = None) -> None:
    check_status(reply)
    check_no_session_issued(reply)
    check_location(stack, reply)
    check_upstream(reply, identity)


USERS: dict[str, dict[str, object]] = {
    "alice": {
        "sub": "alice",
        "email": "alice@example.com",
        "groups": ["admins", "staff"],
        "preferred_username": "alice",
    },
    "bob": {
        "sub": "bob",
        "email": "bob@example.org",
        "groups": ["staff"],
        "preferred_username": "bob",
    },
}


# -- strategies -----------------------------------------------------------------------------

# Characters a request target may carry on the wire (RFC 3986 pchar, plus a few that
# servers see in practice), and the percent-encodings that matter for paths.
_PATH_CHARS = "abcdefghijklmnopqrstuvwxyzADMINOAUTH0123456789-._~!$&'()*+,;=:@/%?#"
_ENCODINGS = (
    "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%00", "%25", "%20", "%09", "%0a", "%0d",
    "%3b", "%3f", "%23", "%c0%af", "%e2%80%8b", "%ef%bb%bf", "%c2%a0", "%ff", "%61", "%41",
    "%6d", "%75", "%2e%2e", "%252e", "%u002e", "%",
)  # fmt: skip
_SEGMENTS = (
    "", ".", "..", "...", "oauth2", "OAUTH2", "auth", "start", "callback", "sign_out",
    "signed_out", "userinfo", "backchannel_logout", "admin", "Admin", "ADMIN", "admin.",
    "admin ", "api", "public", "metrics", "healthz", "readyz", ".well-known", "jwks.json",
    "_echo", "x",
)  # fmt: skip

path_piece = st.one_of(
    st.sampled_from(_SEGMENTS),
    st.sampled_from(_ENCODINGS),
    st.text(alphabet=_PATH_CHARS, max_size=8),
)


@st.composite
def raw_paths(draw: st.DrawFn) -> str:
    """A request target: mostly segment-shaped, with encodings, dots and odd separators."""
    pieces = draw(st.lists(path_piece, min_size=0, max_size=8))
    seps = draw(st.lists(st.sampled_from(["/", "/", "/", "//", "/./", "/../", ""]),
                         min_size=len(pieces), max_size=len(pieces)))  # fmt: skip
    path = "/" + "".join(s + p for s, p in zip(seps, pieces, strict=True))
    return path.replace(" ", "%20")


def spellings(name: str) -> st.SearchStrategy[str]:
    """The name in any case, with any of its dashes written as underscores."""
    return st.lists(st.booleans(), min_size=len(name) * 2, max_size=len(name) * 2).map(
        lambda flips: "".join(
            ("_" if flips[i] else "-")
            if c == "-"
            else (c.upper() if flips[len(name) + i] else c.lower())
            for i, c in enumerate(name)
        )
    )


header_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
).map(lambda v: f"{SPOOF} {v}".strip())


def spoofed_headers(
    names: tuple[str, ...] = IDENTITY_NAMES,
) -> st.SearchStrategy[list[tuple[str, str]]]:
    """Identity headers in any spelling, some several times, with values marked SPOOF."""
    one = st.sampled_from(names).flatmap(spellings)
    return st.lists(st.tuples(one, header_value), max_size=8)


# Other client headers that steer the gateway.
noise_headers = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "Accept",
                "Sec-Fetch-Mode",
                "X-Requested-With",
                "Upgrade",
                "Connection",
                "Authorization",
                "X-Request-Id",
                "Origin",
                "Sec-Fetch-Site",
                "Content-Type",
                "Cookie",
                "Host",
                "TE",
                "Expect",
                "Proxy-Authorization",
                "Keep-Alive",
            ]
        ),
        st.one_of(
            st.sampled_from(
                [
                    "text/html",
                    "application/json",
                    "navigate",
                    "cors",
                    "XMLHttpRequest",
                    "websocket",
                    "Upgrade",
                    "keep-alive, X-Forwarded-User",
                    "Bearer abc",
                    "Basic Zm9vOmJhcg==",
                    "same-origin",
                    "null",
                    "close",
                    "trailers",
                    "100-continue",
                    "gw_test=x",
                    "gw_test-login-0=1.x",
                ]
            ),
            st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
        ),
    ),
    max_size=5,
).map(lambda hs: [(n, v) for n, v in hs if n.lower() != "host" or v])


def cookie_text(max_size: int = 30) -> st.SearchStrategy[str]:
    """Any text a client can put in a cookie value (no controls, no ';')."""
    return st.text(
        alphabet=st.characters(exclude_categories=("Cc", "Cs"), exclude_characters=";"),
        max_size=max_size,
    )


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_decode_loose(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None


_MUTATION_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/%"
_OPS = ["flip", "truncate", "append", "insert", "delete", "swapcase", "reencode", "oversize",
        "pad", "dup", "bitflip"]  # fmt: skip

# One edit: (operation, position, bit, inserted text, repeat). Drawn without looking at the
# value, so the same edits apply to a value captured at run time (a fresh login each example).
Mutation = tuple[str, int, int, str, int]
mutations = st.lists(
    st.tuples(
        st.sampled_from(_OPS), st.integers(0, 1 << 16), st.integers(0, 7),
        st.text(alphabet=_MUTATION_CHARS, min_size=1, max_size=8), st.integers(2, 40),
    ),
    min_size=1, max_size=3,
)  # fmt: skip


def apply_mutations(value: str, edits: list[Mutation]) -> str:
    """A real value (cookie, state, token) with a few damaging edits."""
    text = value
    for op, pos, bit, chunk, repeat in edits:
        i = pos % len(text) if text else 0
        if op == "flip":
            text = text[:i] + chunk[0] + text[i + 1 :]
        elif op == "truncate":
            text = text[:i]
        elif op == "append":
            text += chunk
        elif op == "insert":
            text = text[:i] + chunk + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + 1 :]
        elif op == "swapcase":
            text = text[:i] + text[i:].swapcase()
        elif op == "reencode":
            raw = b64u_decode_loose(text.split(".")[-1]) or text.encode()
            enc = ["std", "padded", "hex", "quoted"][bit % 4]
            if enc == "std":
                text = base64.b64encode(raw).decode()
            elif enc == "padded":
                text = base64.urlsafe_b64encode(raw).decode()
            elif enc == "hex":
                text = raw.hex()
            else:
                text = '"' + text + '"'
        elif op == "oversize":
            text = text * repeat
        elif op == "pad":
            text += "=" * (1 + bit % 3)
        elif op == "dup":
            text = text + "." + text
        elif op == "bitflip":
            raw = b64u_decode_loose(text)
            if raw:
                j = pos % len(raw)
                text = b64u(raw[:j] + bytes([raw[j] ^ (1 << bit)]) + raw[j + 1 :])
    return text


def mutated(value: str) -> st.SearchStrategy[str]:
    return mutations.map(lambda edits: apply_mutations(value, edits))


def server_reads(value: str) -> str:
    """A cookie value as the server reads it: a quoted value (RFC 6265 §4.1.1) unquoted."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def same_sealed(a: str, b: str) -> bool:
    """Whether two sealed values (cookies) carry the same bytes for the gateway: its decoder
    ignores the unused low bits of the last base64url character, so a few spellings do."""
    try:
        return b64u_decode(server_reads(a)) == b64u_decode(server_reads(b))
    except ValueError:
        return False


def json_values(max_leaves: int = 8) -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=True),
        st.text(max_size=20),
    )  # fmt: skip
    return st.recursive(
        scalars,
        lambda kids: st.one_of(
            st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def jwt_shaped(header: object, claims: object, signature: bytes) -> str:
    def part(obj: object) -> str:
        raw = obj if isinstance(obj, bytes) else json.dumps(obj, allow_nan=True).encode()
        return b64u(raw)

    return f"{part(header)}.{part(claims)}.{b64u(signature)}"
