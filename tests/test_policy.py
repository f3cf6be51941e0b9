"""Pure policy decisions: the normalized path (SECURITY.md 17), route matching, ``require``."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import RequireSettings, RouteSettings
from gateway.policy import (
    MAX_PATH,
    Decision,
    PathRejected,
    RouteTable,
    check_requirements,
    email_in_domains,
    normalize_path,
)
from gateway.session import Identity

UPSTREAM = "http://127.0.0.1:8080"

# -- normalize_path ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/admin", "/admin"),
        ("//admin", "/admin"),
        ("///admin//x", "/admin/x"),
        ("/public/../admin", "/admin"),
        ("/public/./../admin", "/admin"),
        ("/../../admin", "/admin"),
        ("/a/b/../../..", "/"),
        ("/a/./b/", "/a/b/"),
        ("/a/b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/a//", "/a/"),
        ("/public%2E%2E/x", "/public../x"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/%2E/admin", "/public/admin"),
        ("/%61dmin", "/admin"),
        ("/caf%C3%A9", "/café"),
        ("/a%20b", "/a b"),
        ("/public?x=/admin", "/public"),
        ("/public?x=/../admin", "/public"),
        ("/public#/../admin", "/public"),
        ("/x/y?q=%2F#frag", "/x/y"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/public%2F..%2Fadmin",
        "/public%2f..%2fadmin",
        "/admin;x",
        "/admin;jsessionid=1",
        "/public/..;/admin",
        "/admin%3Bx",
        "/public%5C..%5Cadmin",
        "/public%5c..",
        "/public\\..\\admin",
        "/admin%00",
        "/admin%00.html",
        "/admin%2500",
        "/%25",
        "/a%252Fb",
        "/a\x00b",
        "/a\tb",
        "/a\nb",
        "/a\rb",
        "/a%09b",
        "/a%0Ab",
        "/a%0d%0a",
        "/a%1Fb",
        "/a%7Fb",
        "/a\x7fb",
        "/%FF",
        "/%C3%28",
        "/%C0%AF",  # overlong '/' (CVE-2000-0884 style)
        "/%ED%A0%80",  # a UTF-16 surrogate
        "/%",
        "/%4",
        "/%zz",
        "admin",
        "",
        "*",
        "http://evil/admin",
        "/" + "a" * MAX_PATH,
    ],
)
def test_normalize_rejects(raw: str) -> None:
    with pytest.raises(PathRejected):
        normalize_path(raw)


def test_path_rejected_is_a_value_error() -> None:
    assert issubclass(PathRejected, ValueError)


# -- RouteTable ----------------------------------------------------------------------------------


def route(prefix: str, **kw: Any) -> RouteSettings:
    return RouteSettings(prefix=prefix, upstream=UPSTREAM, **kw)


TABLE_SETTINGS = [
    route("/"),
    route("/public", auth="none"),
    route("/api"),
    route("/api/v2/"),
    route("/admin", require={"groups": ["admins"]}),
]
TABLE = RouteTable(TABLE_SETTINGS)


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        ("/", "/"),
        ("/anything", "/"),
        ("/api", "/api"),
        ("/api/", "/api"),
        ("/api/users", "/api"),
        ("/apix", "/"),
        ("/api-docs", "/"),
        ("/api/v2", "/api/v2/"),
        ("/api/v2/x", "/api/v2/"),
        ("/api/v20", "/api"),
        ("/public", "/public"),
        ("/public/x/y", "/public"),
        ("/publicity", "/"),
        ("/admin", "/admin"),
        ("/admin/", "/admin"),
        ("/administrator", "/"),
    ],
)
def test_longest_whole_segment_prefix(path: str, prefix: str) -> None:
    matched = TABLE.match(path)
    assert matched is not None
    assert matched.prefix == prefix


def test_route_order_in_config_does_not_matter() -> None:
    forward = RouteTable([route("/"), route("/a"), route("/a/b")])
    backward = RouteTable([route("/a/b"), route("/a"), route("/")])
    for path in ("/a/b/c", "/a/x", "/z"):
        f, b = forward.match(path), backward.match(path)
        assert f is not None and b is not None
        assert f.prefix == b.prefix


def test_no_root_route_means_no_match() -> None:
    table = RouteTable([route("/api")])
    assert table.match("/other") is None
    assert table.match("/apix") is None
    matched = table.match("/api/x")
    assert matched is not None and matched.index == 0


def test_public_flag_and_index() -> None:
    matched = TABLE.match("/public/a")
    assert matched is not None
    assert matched.public
    assert matched.index == 1
    root = TABLE.match("/x")
    assert root is not None and not root.public


def test_normalized_path_decides_the_route() -> None:
    """SECURITY.md 17: tricks that reach /admin at the upstream get /admin's decision."""
    for raw in ("//admin", "/public/../admin", "/public/%2e%2e/admin", "/./admin/"):
        matched = TABLE.match(normalize_path(raw))
        assert matched is not None
        assert matched.prefix == "/admin", raw


# Spellings that IIS, ASP.NET, Spring's lenient matchers or Windows file servers serve as
# /admin (issue 7 item 9): each gets /admin's decision or is refused, never "/"'s.
FOLDED_ADMIN = [
    "/admin.",
    "/admin..",
    "/admin%20",
    "/admin.%20.",
    "/admin%09",
    "/admin./x",
    "/admin%20/x",
    "/admin%E3%80%80",  # U+3000 ideographic space
    "/%EF%BD%81dmin",  # fullwidth a (NFKC)
    "/admin%EF%BC%8Fx",  # fullwidth solidus (NFKC "/")
    "/admin::$DATA",  # an NTFS stream of /admin
    "/admin:x/y",
    "/public.",  # / and /public: the literal and folded spellings disagree here too
    "/api/v2./x",  # /api literally, /api/v2/ folded
]
FORMAT_CHARS = [
    "/admin%E2%80%8B",  # U+200B zero width space
    "/ad%E2%80%8Bmin",
    "/%EF%BB%BFadmin",  # U+FEFF
    "/ad%C2%ADmin",  # U+00AD soft hyphen
    "/admin%E2%80%8E",  # U+200E left-to-right mark
    "/admin%C2%85",  # U+0085, a C1 control
    "/admin/...",
    "/admin/.%20/x",
    "/%20",
    "/admin/%EF%BC%8E%EF%BC%8E/x",  # fullwidth "..": NFKC makes it a parent segment
]


@pytest.mark.parametrize("raw", FOLDED_ADMIN + FORMAT_CHARS)
def test_folded_spellings_of_a_protected_route_are_refused(raw: str) -> None:
    with pytest.raises(PathRejected):
        path = normalize_path(raw)
        TABLE.match(path)
    ci = RouteTable(TABLE_SETTINGS, case_insensitive=True)
    with pytest.raises(PathRejected):
        ci.match(normalize_path(raw))


@pytest.mark.parametrize(
    ("raw", "prefix"),
    [
        ("/file.tar.gz", "/"),
        ("/v1.2/x", "/"),
        ("/admin/file.txt", "/admin"),
        ("/admin/x.", "/admin"),  # both spellings are /admin's: no reason to refuse
        ("/admin/a%20b", "/admin"),
        ("/v1/things:batchGet", "/"),  # a colon inside a route's own paths is no reason
        ("/admin/x:y", "/admin"),
        ("/:id", "/"),
        ("/caf%C3%A9", "/"),
        ("/%E5%90%8D%E5%89%8D", "/"),
        ("/.well-known/x", "/"),
        ("/ADMIN", "/"),  # case-sensitive by default, like RFC 3986
    ],
)
def test_legitimate_paths_keep_their_route(raw: str, prefix: str) -> None:
    matched = TABLE.match(normalize_path(raw))
    assert matched is not None
    assert matched.prefix == prefix, raw


@pytest.mark.parametrize("raw", ["/ADMIN", "/Admin/", "/aDmIn/x", "/ADMIN/Panel"])
def test_case_insensitive_routes_give_the_protected_decision(raw: str) -> None:
    ci = RouteTable(TABLE_SETTINGS, case_insensitive=True)
    matched = ci.match(normalize_path(raw))
    assert matched is not None
    assert matched.prefix == "/admin"
    mixed = RouteTable([route("/"), route("/Reports/", auth="none")], case_insensitive=True)
    found = mixed.match("/REPORTS/q")
    assert found is not None and found.prefix == "/Reports/"


# -- check_requirements ---------------------------------------------------------------------------


def ident(**claims: Any) -> Identity:
    return Identity(sub="u1", claims=claims)


def req(**kw: Any) -> RouteSettings:
    return route("/", require=RequireSettings(**kw))


def mail(email: Any, **claims: Any) -> Identity:
    """An identity whose provider says its email is verified."""
    return ident(email=email, email_verified=True, **claims)


def test_no_requirements_allow_anyone() -> None:
    assert check_requirements(req(), ident(), []).allowed


def test_scopes_all_required() -> None:
    r = req(scopes=["read", "write"])
    assert check_requirements(r, ident(), ["openid", "read", "write"]).allowed
    decision = check_requirements(r, ident(), ["read"])
    assert not decision.allowed
    assert decision.reason == "missing scope"


def test_groups_any_one_suffices() -> None:
    r = req(groups=["admins", "ops"])
    assert check_requirements(r, ident(groups=["staff", "ops"]), []).allowed
    assert check_requirements(r, ident(groups="admins"), []).allowed
    assert not check_requirements(r, ident(groups=["staff"]), []).allowed
    assert not check_requirements(r, ident(groups=["Admins"]), []).allowed
    assert not check_requirements(r, ident(), []).allowed
    assert not check_requirements(r, ident(groups={"admins": True}), []).allowed


def test_emails_exact_match_case_insensitive() -> None:
    r = req(emails=["Alice@Example.com"])
    assert check_requirements(r, mail("alice@example.com"), []).allowed
    assert not check_requirements(r, mail("alice@example.com.evil"), []).allowed
    assert not check_requirements(r, mail("bob@example.com"), []).allowed
    assert not check_requirements(r, ident(), []).allowed


def test_email_domains() -> None:
    r = req(email_domains=["example.com", "@Corp.Example"])
    assert check_requirements(r, mail("a@example.com"), []).allowed
    assert check_requirements(r, mail("a@EXAMPLE.COM"), []).allowed
    assert check_requirements(r, mail("a@corp.example"), []).allowed
    for bad in (
        "a@sub.example.com",
        "a@example.com.evil",
        "a@evilexample.com",
        "example.com",
        "@example.com",
        "a@",
    ):
        assert not check_requirements(r, mail(bad), []).allowed, bad


def test_two_at_signs_never_match() -> None:
    for email in ("evil@example.com@example.com", "a@evil.com@example.com", "a@@example.com"):
        assert not check_requirements(req(email_domains=["example.com"]), mail(email), []).allowed
        assert not check_requirements(req(emails=[email]), mail(email), []).allowed
        assert not email_in_domains(email, ["example.com"])


def test_email_verified_false_refused() -> None:
    r = req(email_domains=["example.com"])
    assert not check_requirements(r, ident(email="a@example.com", email_verified=False), []).allowed
    # Some providers (Amazon Cognito) send the claim as a string.
    assert not check_requirements(
        r, ident(email="a@example.com", email_verified="false"), []
    ).allowed
    assert check_requirements(r, ident(email="a@example.com", email_verified=True), []).allowed
    assert check_requirements(r, ident(email="a@example.com", email_verified="true"), []).allowed
    # Anything that is not a plain yes is no.
    for odd in (None, 1, "yes", "", [True], {"value": True}):
        decision = check_requirements(r, ident(email="a@example.com", email_verified=odd), [])
        assert decision == Decision(False, "no verified email"), odd


def test_missing_email_verified_is_not_verified_unless_the_route_allows_it() -> None:
    """oauth2-proxy's default: a provider that does not say the address is verified has not
    verified it. ``allow_unverified_email`` accepts the missing claim, never a false one."""
    for rule in ({"email_domains": ["example.com"]}, {"emails": ["a@example.com"]}):
        strict = check_requirements(req(**rule), ident(email="a@example.com"), [])
        assert strict == Decision(False, "no verified email"), rule
        lenient = req(**rule, allow_unverified_email=True)
        assert check_requirements(lenient, ident(email="a@example.com"), []) == Decision(True)
        for flag in (False, "false", "FALSE"):
            decision = check_requirements(
                lenient, ident(email="a@example.com", email_verified=flag), []
            )
            assert decision == Decision(False, "no verified email"), (rule, flag)
    # Without an email rule the claim does not matter.
    assert check_requirements(req(groups=["g"]), ident(groups=["g"]), []) == Decision(True)


def test_non_string_email_refused() -> None:
    r = req(emails=["a@example.com"])
    assert not check_requirements(r, mail(["a@example.com"]), []).allowed


def test_emails_or_domains_either_suffices() -> None:
    r = req(emails=["boss@partner.org"], email_domains=["example.com"])
    assert check_requirements(r, mail("boss@partner.org"), []).allowed
    assert check_requirements(r, mail("x@example.com"), []).allowed
    assert not check_requirements(r, mail("x@partner.org"), []).allowed


def test_lists_combine_with_and() -> None:
    r = req(groups=["admins"], email_domains=["example.com"], scopes=["admin"])
    good = mail("a@example.com", groups=["admins"])
    assert check_requirements(r, good, ["admin"]).allowed
    assert not check_requirements(r, good, []).allowed
    assert not check_requirements(r, mail("a@other.com", groups=["admins"]), ["admin"]).allowed
    assert not check_requirements(r, mail("a@example.com", groups=["x"]), ["admin"]).allowed
    assert not check_requirements(
        r, ident(groups=["admins"], email="a@other.com"), ["admin"]
    ).allowed
    assert not check_requirements(r, ident(groups=["x"], email="a@example.com"), ["admin"]).allowed


@pytest.mark.parametrize("raw", ["/\udc80", "/caf\udcc3", "/a/\udcff/b"])
def test_bytes_that_are_not_utf8_are_rejected_not_a_crash(raw: str) -> None:
    # aiohttp hands over header values (X-Forwarded-Uri) and, with its pure-Python parser,
    # request targets with non-UTF-8 bytes surrogate-escaped; found by tests/fuzz (a 500).
    with pytest.raises(PathRejected):
        normalize_path(raw)
