"""Hostile input over real HTTP: open redirects (SECURITY.md 9) and malformed requests.

Every hostile value gets a clear 4xx (or a same-origin answer), never a redirect off-site
and never a 500; after the barrage the gateway still answers ``/healthz``.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from yarl import URL

from tests.conftest import Stack
from tests.idp_client import FormParser, http_login
from tests.support.raw import raw_get, raw_request

NAV = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
API = {"Accept": "application/json"}

# -- 9: open redirects ----------------------------------------------------------------------

HOSTILE_RD = [
    "//evil.example",
    "//evil.example/path",
    "/\\evil.example",
    "\\\\evil.example",
    "/%5Cevil.example",
    "/%5cevil.example",
    "/%2F%2Fevil.example",
    "/%2f/evil.example",
    "/%252F%252Fevil.example",
    "https:evil.example",
    "https:/evil.example",
    "http:\\\\evil.example",
    "https://evil.example",
    "https://evil.example/",
    "HTTPS://EVIL.EXAMPLE",
    "https://{good}@evil.example",
    "https://{good}%40evil.example",
    "https://evil.example\\@{good}",
    "https://evil.example#@{good}",
    "https://evil.example?@{good}",
    "http://{good}.evil.example/",
    "http://evil-{good}/",
    "good.com.evil",
    "evil-good.com",
    "evil.example",
    "%09//evil.example",
    "\t//evil.example",
    "/\t/evil.example",
    "/%09/evil.example",
    " //evil.example",
    "%20//evil.example",
    "//%09evil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "javascript://%0aalert(1)",
    "data:text/html,<script>alert(1)</script>",
    "vbscript:msgbox(1)",
    "ftp://evil.example/",
    "/ok\r\nLocation: https://evil.example",
    "/ok%0d%0aSet-Cookie:%20x=1",
    "/ok\nX: y",
    "/ok\x00",
    "/" + "a" * 5000,
    "/?" + "b" * 9000,
    "",
]

SAFE_RD = ["/", "/ok", "/ok?x=1&y=2", "/a/b/c#frag", "/search?q=a%20b", "{own}/own-absolute"]


def fill(value: str, stack: Stack) -> str:
    return value.replace("{good}", URL(stack.url).raw_authority).replace("{own}", stack.url)


def assert_same_origin(location: str, stack: Stack) -> None:
    """A Location (or link) that stays on the gateway's origin."""
    assert "\\" not in location and "\t" not in location, location
    absolute = URL(stack.url).join(URL(location, encoded=True))
    assert absolute.origin() == URL(stack.url).origin(), location
    if not location.startswith(stack.url):
        assert location.startswith("/") and not location.startswith("//"), location


@pytest.mark.parametrize("rd", HOSTILE_RD, ids=range(len(HOSTILE_RD)))
async def test_start_refuses_hostile_rd(stack: Stack, rd: str) -> None:
    rd = fill(rd, stack)
    url = URL(stack.url + "/oauth2/start").with_query(rd=rd)
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(url, headers=NAV, allow_redirects=False) as resp,
    ):
        body = await resp.text()
        assert resp.status == 400, (rd, resp.status, resp.headers.get("Location"))
        assert "Location" not in resp.headers
        assert "evil.example" not in body
        assert "<script>" not in body
        assert not resp.headers.getall("Set-Cookie", [])


@pytest.mark.parametrize(
    "query",
    [
        "rd=//evil.example",
        "rd=/%2F/evil.example",
        "rd=%2F%2Fevil.example",
        "rd=%252F%252Fevil.example",
        "rd=/%5Cevil.example",
        "rd=%5C%5Cevil.example",
        "rd=https:evil.example",
        "rd=%09//evil.example",
        "rd=/ok%0D%0ALocation:%20http://evil.example",
        "rd=javascript:alert(1)",
        "rd=/ok&rd=//evil.example",
        "rd=//evil.example&rd=/ok",
        "rd=%E2%80%AE//evil.example",
        "rd=%C0%AF%C0%AFevil.example",
        "rd=/%C0%AF/evil.example",
    ],
)
async def test_start_refuses_hostile_raw_query(
    stack: Stack, browser: aiohttp.ClientSession, query: str
) -> None:
    """The same, with the query spelled on the wire exactly (no client-side re-encoding)."""
    url = URL(f"{stack.url}/oauth2/start?{query}", encoded=True)
    async with browser.get(url, allow_redirects=False) as resp:
        status, location = resp.status, resp.headers.get("Location")
    if status == 400:
        assert location is None
        return
    # Accepted only when what rd decodes to is a path of ours (the first rd wins; an
    # invalid UTF-8 sequence decodes to U+FFFD, not to a slash): the login proves where
    # it lands.
    assert status == 302, (query, status)
    assert location is not None and location.startswith(str(stack.idp.url)), query
    result = await http_login(
        browser, str(url), "bob", "bob", stop_at=stack.url + "/oauth2/callback"
    )
    assert result.location is not None
    async with browser.get(result.location, allow_redirects=False) as cb:
        assert cb.status == 302
        assert_same_origin(cb.headers["Location"], stack)
        assert "evil" not in cb.headers["Location"].split("/")[1], cb.headers["Location"]


@pytest.mark.parametrize("rd", SAFE_RD)
async def test_start_accepts_same_origin_rd(
    stack: Stack, browser: aiohttp.ClientSession, rd: str
) -> None:
    rd = fill(rd, stack)
    url = URL(stack.url + "/oauth2/start").with_query(rd=rd)
    async with browser.get(url, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        assert resp.headers["Location"].startswith(str(stack.idp.url))
    # The whole login lands where rd said, on our origin.
    result = await http_login(
        browser, str(url), "bob", "bob", stop_at=stack.url + "/oauth2/callback"
    )
    assert result.location is not None
    async with browser.get(result.location, allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    assert_same_origin(location, stack)
    # rd travels in the query (a "#" in it encoded), so the landing is rd exactly, fragment too.
    assert location == rd.removeprefix(stack.url)


async def test_deep_link_with_double_slash_lands_same_origin(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    """``//evil.com/x`` as a *path* of ours is normalized, and the login returns to it here."""
    u = URL(stack.url)
    resp = await raw_request(
        stack.url, raw_get("//evil.com/x?y=1", u.raw_authority, list(NAV.items()))
    )
    assert resp.status == 302
    start = resp.headers["Location"]
    assert start.startswith("/oauth2/start?")
    (rd,) = parse_qs(urlsplit(start).query)["rd"]
    assert rd == "/evil.com/x?y=1"
    result = await http_login(
        browser, stack.url + start, "bob", "bob", stop_at=stack.url + "/oauth2/callback"
    )
    assert result.location is not None
    async with browser.get(result.location, allow_redirects=False) as cb:
        assert cb.status == 302
        landing = cb.headers["Location"]
    assert_same_origin(landing, stack)
    assert landing == "/evil.com/x?y=1"
    # And that path is served by our upstream.
    async with browser.get(stack.url + landing, headers=API) as done:
        assert done.status == 200
        assert (await done.json())["path"] == "/evil.com/x"


async def test_deep_link_with_encoded_slashes_never_redirects_off_site(stack: Stack) -> None:
    u = URL(stack.url)
    for target in ("/%2F%2Fevil.com", "/%5Cevil.com", "/\\evil.com", "/%09/evil.com"):
        resp = await raw_request(stack.url, raw_get(target, u.raw_authority, list(NAV.items())))
        # Refused as ambiguous before any login redirect could carry it.
        assert resp.status == 400, (target, resp.status)
        assert "Location" not in resp.headers, target


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.links.append(href)


async def sign_out_with_rd(stack: Stack, rd: str) -> list[str]:
    """Sign in, submit the sign-out form with ``rd`` forced in; every Location and the
    signed-out page's links, in order."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers=NAV
    ) as http:
        result = await http_login(http, stack.url + "/", "bob", "bob")
        assert result.status == 200
        async with http.get(stack.url + "/oauth2/sign_out", params={"rd": rd}) as resp:
            parser = FormParser()
            parser.feed(await resp.text())
        (form,) = [f for f in parser.forms if f.method == "post"]
        fields = {name: value for _, name, value in form.fields}
        # The form filtered rd; an attacker who could submit it would still send his own.
        fields["rd"] = rd
        seen: list[str] = []
        url: URL = URL(stack.url + "/oauth2/sign_out")
        method = "POST"
        for _ in range(6):
            async with http.request(
                method,
                url,
                data=fields if method == "POST" else None,
                headers={"Origin": stack.url} if method == "POST" else None,
                allow_redirects=False,
            ) as resp:
                if resp.status in (302, 303):
                    location = resp.headers["Location"]
                    seen.append(location)
                    url, method = url.join(URL(location, encoded=True)), "GET"
                    continue
                assert resp.status == 200, (rd, resp.status)
                links = _Links()
                links.feed(await resp.text())
                return [*seen, *links.links]
    raise AssertionError("sign-out did not finish")


@pytest.mark.parametrize(
    "rd",
    [
        "//evil.example",
        "/\\evil.example",
        "/%5Cevil.example",
        "/%2F%2Fevil.example",
        "https:evil.example",
        "https://{good}@evil.example",
        "https://evil.example/",
        "%09//evil.example",
        "javascript:alert(1)",
        "data:text/html,x",
        "/ok\r\nX: y",
        "/" + "a" * 5000,
    ],
)
async def test_sign_out_rd_never_leads_off_site(stack: Stack, rd: str) -> None:
    rd = fill(rd, stack)
    hops = await sign_out_with_rd(stack, rd)
    assert hops[-1] == "/", hops  # the Continue link falls back to the default
    for hop in hops:
        if hop.startswith(str(stack.idp.url)):
            # The provider's end_session: its post_logout_redirect_uri is ours.
            (post,) = parse_qs(urlsplit(hop).query)["post_logout_redirect_uri"]
            assert post == stack.url + "/oauth2/signed_out"
            assert "evil" not in hop
        else:
            assert_same_origin(hop, stack)


async def test_sign_out_safe_rd_is_honoured(stack: Stack) -> None:
    hops = await sign_out_with_rd(stack, "/goodbye?x=1")
    assert hops[-1] == "/goodbye?x=1"


async def test_signed_out_page_ignores_forged_state(stack: Stack) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for query in ("?state=x", "?state=", "?rd=//evil.example", "?state=%00%ff"):
            async with http.get(stack.url + "/oauth2/signed_out" + query, headers=NAV) as resp:
                assert resp.status == 200
                links = _Links()
                links.feed(await resp.text())
                assert links.links == ["/"]
            cookie = f"{stack.settings.session.cookie_name}-logout=garbage"
            async with http.get(
                stack.url + "/oauth2/signed_out" + query, headers={**NAV, "Cookie": cookie}
            ) as resp:
                assert resp.status == 200


# -- malformed requests ------------------------------------------------------------------------

STATE = "A" * 43


def malformed(host: str, name: str) -> list[tuple[str, bytes]]:
    """(label, bytes on the wire) of more than fifty broken or absurd requests."""
    ok = f"Host: {host}\r\nConnection: close\r\n"
    cookie = f"Cookie: {name}=x\r\n"

    def req(line: str, extra: str = "", body: str = "") -> bytes:
        return (line + "\r\n" + ok + extra + "\r\n" + body).encode("latin-1")

    def cb(query: str) -> bytes:
        return req(f"GET /oauth2/callback?{query} HTTP/1.1", "Accept: text/html\r\n")

    return [
        ("space in method", req("GE T / HTTP/1.1")),
        ("unknown method", req("FROB / HTTP/1.1")),
        ("unknown method on public", req("FROB /public/x HTTP/1.1")),
        ("lowercase method", req("get / HTTP/1.1")),
        ("NUL in method", req("G\x00T / HTTP/1.1")),
        ("huge method", req("A" * 9000 + " / HTTP/1.1")),
        ("TRACE", req("TRACE / HTTP/1.1")),
        ("TRACE public", req("TRACE /public HTTP/1.1")),
        ("CONNECT", req(f"CONNECT {host} HTTP/1.1")),
        ("huge query", req("GET /public?" + "q" * 100_000 + " HTTP/1.1")),
        ("huge path", req("GET /" + "p" * 100_000 + " HTTP/1.1")),
        ("long path under line limit", req("GET /" + "a/" * 3000 + " HTTP/1.1")),
        ("NUL in path", req("GET /a\x00b HTTP/1.1")),
        ("encoded NUL in path", req("GET /public/%00 HTTP/1.1")),
        ("invalid UTF-8 bytes in path", req("GET /public/\xff\xfe HTTP/1.1")),
        ("invalid UTF-8 encoded in path", req("GET /public/%ff%fe HTTP/1.1")),
        ("overlong UTF-8 slash", req("GET /public/%c0%af..%c0%afadmin HTTP/1.1")),
        ("bad percent", req("GET /public/%zz HTTP/1.1")),
        ("lone percent", req("GET /public/% HTTP/1.1")),
        ("truncated percent", req("GET /public/%4 HTTP/1.1")),
        ("bad percent in query", req("GET /public?%zz=%ff&%=% HTTP/1.1")),
        ("control char in query", req("GET /public?a=\x01 HTTP/1.1")),
        ("relative target", req("GET ../../etc/passwd HTTP/1.1")),
        ("asterisk GET", req("GET * HTTP/1.1")),
        ("broken absolute URI", req("GET http://[::1/ HTTP/1.1")),
        ("bad version", req("GET / HTTP/9.9")),
        ("garbage version", req("GET / FOO/1.1")),
        ("HTTP/0.9", b"GET /\r\n\r\n"),
        ("no Host", b"GET /public HTTP/1.1\r\nConnection: close\r\n\r\n"),
        ("two Hosts", req("GET /public HTTP/1.1", "Host: other.example\r\n")),
        ("weird Host", b"GET /public HTTP/1.1\r\nHost: [::1\r\nConnection: close\r\n\r\n"),
        ("header without colon", req("GET / HTTP/1.1", "NoColonHere\r\n")),
        ("space in header name", req("GET / HTTP/1.1", "Bad Header: x\r\n")),
        ("space before colon", req("GET / HTTP/1.1", "Accept : text/html\r\n")),
        ("NUL in header value", req("GET / HTTP/1.1", "X-A: a\x00b\r\n")),
        ("obs-fold", req("GET / HTTP/1.1", "X-A: a\r\n  folded\r\n")),
        ("huge header name", req("GET / HTTP/1.1", "X" * 20000 + ": 1\r\n")),
        ("huge header value", req("GET / HTTP/1.1", "X-A: " + "v" * 70000 + "\r\n")),
        ("many headers", req("GET / HTTP/1.1", "".join(f"X-H{i}: {i}\r\n" for i in range(500)))),
        ("huge Accept", req("GET / HTTP/1.1", "Accept: " + "text/html," * 1500 + "\r\n")),
        ("negative Content-Length", req("POST /public HTTP/1.1", "Content-Length: -1\r\n")),
        ("text Content-Length", req("POST /public HTTP/1.1", "Content-Length: abc\r\n")),
        (
            "CL and TE",
            req(
                "POST /public HTTP/1.1",
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        (
            "two different CLs",
            req("POST /public HTTP/1.1", "Content-Length: 1\r\nContent-Length: 2\r\n", "ab"),
        ),
        (
            "bad chunk",
            req("POST /public HTTP/1.1", "Transfer-Encoding: chunked\r\n", "zz\r\nab\r\n0\r\n\r\n"),
        ),
        (
            "unknown TE",
            req("POST /public HTTP/1.1", "Transfer-Encoding: gzip, chunked, foo\r\n", "0\r\n\r\n"),
        ),
        ("garbage cookie", req("GET / HTTP/1.1", "Cookie: ;;;==;=;a=b=c;\x7f\r\n")),
        ("control char in cookie", req("GET / HTTP/1.1", f"Cookie: {name}=\x01\x02\r\n")),
        ("junk request id", req("GET /public HTTP/1.1", "X-Request-Id: \x01<script>\r\n")),
        (
            "bad websocket upgrade",
            req("GET /public/ws HTTP/1.1", "Connection: Upgrade\r\nUpgrade: websocket\r\n"),
        ),
        ("absurd Range", req("GET /public HTTP/1.1", "Range: bytes=" + "0-1," * 2000 + "\r\n")),
        ("callback overlong state", cb(f"state={'s' * 5000}&code=c")),
        ("callback overlong code", cb(f"state={STATE}&code={'c' * 100_00}")),
        ("callback duplicated state", cb(f"state={STATE}&state={STATE}B&code=c")),
        ("callback duplicated code", cb(f"state={STATE}&code=a&code=b")),
        (
            "callback non-ASCII state",
            cb("state=%C3%A9t%C3%A9%C3%A9t%C3%A9%C3%A9t%C3%A9t%C3%A9t%C3%A9&code=c"),
        ),
        ("callback invalid UTF-8", cb("state=%ff%fe%fd&code=%ff")),
        ("callback no params", cb("")),
        ("callback only junk", cb("%%%&&&===")),
        ("callback script error", cb(f"state={STATE}&error=%3Cscript%3Ealert(1)%3C/script%3E")),
        (
            "callback forged login cookie",
            req(
                f"GET /oauth2/callback?state={STATE}&code=c HTTP/1.1",
                f"Cookie: {name}-login-0=1.{'A' * 300}; {name}-login-{STATE[:16]}=garbage\r\n",
            ),
        ),
        (
            "callback cookie no dot",
            req(
                f"GET /oauth2/callback?state={STATE}&code=c HTTP/1.1",
                "".join(f"Cookie: {name}-login-{i}=nodot\r\n" for i in range(20)),
            ),
        ),
        ("callback POST", req(f"POST /oauth2/callback?state={STATE} HTTP/1.1")),
        ("start invalid UTF-8 rd", req("GET /oauth2/start?rd=%ff%fe HTTP/1.1")),
        ("start duplicated rd", req("GET /oauth2/start?rd=/a&rd=/b HTTP/1.1")),
        ("start POST", req("POST /oauth2/start HTTP/1.1", "Content-Length: 0\r\n")),
        ("sign_out NUL rd", req("GET /oauth2/sign_out?rd=%00 HTTP/1.1", cookie)),
        ("sign_out PUT", req("PUT /oauth2/sign_out HTTP/1.1", "Content-Length: 0\r\n")),
        (
            "sign_out bad multipart",
            req(
                "POST /oauth2/sign_out HTTP/1.1",
                cookie + "Content-Type: multipart/form-data; boundary=\r\nContent-Length: 5\r\n",
                "-----",
            ),
        ),
        (
            "sign_out huge form",
            req(
                "POST /oauth2/sign_out HTTP/1.1",
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1200000\r\n",
                "a=" + "b" * 1_199_998,
            ),
        ),
        (
            "backchannel junk",
            req(
                "POST /oauth2/backchannel_logout HTTP/1.1",
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 20\r\n",
                "logout_token=%ff%fe.",
            ),
        ),
        (
            "backchannel raw non-UTF-8",
            req(
                "POST /oauth2/backchannel_logout HTTP/1.1",
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 16\r\n",
                "logout_token=\xff\xfe\xfd",
            ),
        ),
        (
            "sign_out raw non-UTF-8",
            req(
                "POST /oauth2/sign_out HTTP/1.1",
                cookie + "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 8\r\n",
                "rd=\xff\xfe\xfd\xfc\xfb",
            ),
        ),
        (
            "backchannel JSON",
            req(
                "POST /oauth2/backchannel_logout HTTP/1.1",
                "Content-Type: application/json\r\nContent-Length: 2\r\n",
                "{}",
            ),
        ),
        ("userinfo junk cookie", req("GET /oauth2/userinfo HTTP/1.1", cookie)),
        ("healthz with body", req("GET /healthz HTTP/1.1", "Content-Length: 3\r\n", "abc")),
    ]


async def test_malformed_requests_never_500(stack: Stack) -> None:
    host = URL(stack.url).raw_authority
    cases = malformed(host, stack.settings.session.cookie_name)
    assert len(cases) >= 50
    statuses: dict[str, int | None] = {}
    for label, data in cases:
        resp = await raw_request(stack.url, data)
        statuses[label] = resp.status
        assert resp.status is None or resp.status < 500, (label, resp.status, resp.body[:300])
        if resp.status is not None:
            assert b"Traceback" not in resp.body, label
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.headers["Location"]
            assert location.startswith(("/", str(stack.idp.url))), (label, location)
    # Almost every case gets an answer; only a request that is not HTTP at all may be
    # dropped without one.
    silent = [label for label, status in statuses.items() if status is None]
    assert len(silent) <= 3, silent
    async with (
        aiohttp.ClientSession() as http,
        http.get(stack.url + "/healthz") as health,
    ):
        assert health.status == 200
        assert json.loads(await health.text())["status"] == "ok"


async def test_error_pages_escape_what_they_show(stack: Stack) -> None:
    """Provider errors and bad parameters come back escaped, whatever their shape."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for query in (
            "error=%3Cscript%3Ex&state=" + STATE,
            "error=access_denied&error_description=%3Cscript%3Ex&state=" + STATE,
            "state=%3Cscript%3Ex&code=c",
        ):
            async with http.get(stack.url + "/oauth2/callback?" + query, headers=NAV) as resp:
                assert 400 <= resp.status < 500
                assert "<script>" not in await resp.text()
        bad = quote("<script>x</script>")
        async with http.get(stack.url + f"/oauth2/start?rd={bad}", headers=NAV) as resp:
            assert resp.status == 400
            assert "<script>" not in await resp.text()
