"""Logs (issue 4 item 8, SECURITY.md 21): JSON access lines with a request id, and never a
token, code, cookie value, state, verifier or secret in any log record of any logger.

The leak scan runs one whole life of a session with every logger of the process at DEBUG
(the gateway's, aiohttp's server/client/access/websocket loggers, redis, asyncio, the dev
provider's): login with a failed and a replayed callback, proxied requests with secrets in
the query, a websocket, a refresh, a failed refresh, sign-out through the provider (which
sends a back-channel logout), a forged and a real back-channel logout. Every secret the test
saw is collected from the HTTP traffic (query strings, Set-Cookie, forms, echoed headers),
from the stored sessions in Redis and from the dev provider's state, then searched for in
every captured record: literally and inside base64 runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import io
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from http import HTTPStatus
from http.cookies import SimpleCookie
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from pythonjsonlogger.json import JsonFormatter
from yarl import URL

from gateway import keys
from gateway.config import ProviderSettings
from gateway.devidp.keys import corrupt_signature
from gateway.echo import RunningEcho, start_echo
from gateway.errors import ProviderTransportError
from gateway.logs import TextFormatter, WarnLimiter, configure_logging
from gateway.oidc import ProviderClient
from gateway.session import Ticket
from tests.conftest import CLIENT_SECRET, RedisServer, Stack
from tests.idp_client import http_login
from tests.support.browser import callback_url, fetch, open_flow, query_of
from tests.support.clock import sleep_until
from tests.support.logout import confirmation_form, logout_token
from tests.support.ports import free_port

API = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}
# Query parameters that carry nothing secret (URLs, names, the client id) and do appear in
# logs legitimately, e.g. the provider's URL in a warning.
PUBLIC_PARAMS = frozenset(
    {"iss", "redirect_uri", "post_logout_redirect_uri", "client_id", "scope", "response_type",
     "code_challenge_method", "rd", "next", "prompt", "response_mode"}
)  # fmt: skip
ACCESS_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "route")


class Capture(logging.Handler):
    """Keeps every record, formatted as the JSON log would print it and as plain text with
    the traceback, plus every attribute the record carries (``extra`` included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.json = JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
        self.plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(self.json.format(record))
        self.texts.append(self.plain.format(record))
        self.texts.append(repr(vars(record)))
        if record.args:
            self.texts.append(repr(record.args))


@pytest.fixture
def capture(caplog: pytest.LogCaptureFixture) -> Iterator[Capture]:
    """Every logger of the process at DEBUG into one handler (restored afterwards)."""
    caplog.set_level(logging.DEBUG)
    handler = Capture()
    root = logging.getLogger()
    names = [
        "gateway", "aiohttp", "aiohttp.access", "aiohttp.client", "aiohttp.internal",
        "aiohttp.server", "aiohttp.web", "aiohttp.websocket", "asyncio", "redis", "urllib3",
    ]  # fmt: skip
    touched = {n: logging.getLogger(n) for n in names}
    touched.update(
        {
            n: lg
            for n, lg in logging.root.manager.loggerDict.items()
            if isinstance(lg, logging.Logger)
        }
    )
    saved = {n: (lg.level, lg.disabled, lg.propagate) for n, lg in touched.items()}
    root_level = root.level
    for lg in touched.values():
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
        lg.propagate = True
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(root_level)
        for n, lg in touched.items():
            lg.level, lg.disabled, lg.propagate = saved[n]


@pytest.fixture
async def echo() -> AsyncIterator[RunningEcho]:
    running = await start_echo()
    yield running
    await running.close()


class Seen:
    """Every secret value the test met on the wire (filled by an aiohttp trace)."""

    def __init__(self) -> None:
        self.values: set[str] = set()

    def add(self, *values: str | None) -> None:
        for v in values:
            if v and len(v) >= 8:
                self.values.add(v)

    def url(self, url: str | URL) -> None:
        for name, value in parse_qsl(urlsplit(str(url)).query, keep_blank_values=True):
            if name not in PUBLIC_PARAMS:
                self.add(value)

    def trace(self) -> aiohttp.TraceConfig:
        trace = aiohttp.TraceConfig()

        async def on_start(
            s: Any, ctx: SimpleNamespace, p: aiohttp.TraceRequestStartParams
        ) -> None:
            self.url(p.url)
            for value in p.headers.getall("Cookie", []):
                for pair in value.split(";"):
                    self.add(pair.partition("=")[2].strip())
            auth = p.headers.get("Authorization", "")
            self.add(auth.partition(" ")[2])

        async def on_end(s: Any, ctx: SimpleNamespace, p: aiohttp.TraceRequestEndParams) -> None:
            self.url(p.url)
            location = p.response.headers.get("Location")
            if location:
                self.url(location)
            for raw in p.response.headers.getall("Set-Cookie", []):
                jar: SimpleCookie = SimpleCookie()
                jar.load(raw)
                for morsel in jar.values():
                    self.add(morsel.value, morsel.value.partition(".")[2])

        trace.on_request_start.append(on_start)
        trace.on_request_end.append(on_end)
        return trace

    def browser(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
            trace_configs=[self.trace()],
        )


async def api(http: aiohttp.ClientSession, url: str, seen: Seen, **headers: str) -> dict[str, Any]:
    """A proxied API call; the echo's view, with the credentials it received collected."""
    async with http.get(url, headers={**API, **headers}, allow_redirects=False) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = json.loads(await resp.text())
    for name, value in body["headers"]:
        if name.lower() in ("authorization", "x-gateway-assertion"):
            seen.add(value.removeprefix("Bearer "))
        elif name.lower() == "cookie":
            for pair in value.split(";"):
                seen.add(pair.partition("=")[2].strip())
    return body


_B64_RUN = re.compile(r"[A-Za-z0-9_\-+/]{12,}")


def corpus_of(texts: list[str]) -> list[bytes]:
    """The texts, plus every base64/base64url run in them decoded (at each alignment)."""
    out = [t.encode("utf-8", "replace") for t in texts]
    for text in texts:
        for run in _B64_RUN.findall(text):
            for start in range(4):
                chunk = run[start:]
                chunk = chunk[: len(chunk) - len(chunk) % 4]
                for alt in (b"-_", b"+/"):
                    try:
                        out.append(base64.b64decode(chunk.encode(), altchars=alt))
                    except (binascii.Error, ValueError):
                        continue
    return out


async def session_secrets(stack: Stack, cookie: str) -> list[str]:
    ticket = Ticket.from_cookie(cookie, stack.app[keys.RING])
    raw = await stack.app[keys.STORE].load(ticket.store_key)
    if raw is None:
        return []
    t = ticket.open_record(raw).tokens
    return [x for x in (t.access_token, t.refresh_token, t.id_token) if x]


async def token_expiry(stack: Stack, cookie: str) -> float:
    """When the gateway thinks the session's access token expires."""
    ticket = Ticket.from_cookie(cookie, stack.app[keys.RING])
    raw = await stack.app[keys.STORE].load(ticket.store_key)
    assert raw is not None
    expires = ticket.open_record(raw).tokens.expires_at
    assert expires is not None
    return expires


async def test_a_whole_session_logs_no_secret(
    make_stack: Any, echo: RunningEcho, redis_server: RedisServer, capture: Capture
) -> None:
    key_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    url = str(echo.url)
    stack: Stack = await make_stack(
        echo=echo,
        idp_config={"access_token_ttl": 2},
        session={"refresh_skew": 1},
        routes=[
            {"prefix": "/", "upstream": url, "assertion": True},
            {"prefix": "/public", "upstream": url, "auth": "none"},
            {"prefix": "/api", "upstream": url, "on_unauthenticated": "deny"},
        ],
        assertion={"signing_keys": [key_pem]},
    )
    state = stack.idp.state
    seen = Seen()
    found: list[str] = [CLIENT_SECRET, key_pem.splitlines()[1]]
    found += [s.get_secret_value() for s in stack.settings.session.cookie_secrets]

    async with seen.browser() as browser, seen.browser() as other:
        # A failed login: a code from this flow, altered (the provider refuses the exchange).
        bad = URL(await callback_url(browser, stack))
        assert (
            await fetch(browser, str(bad.update_query(code="x" + bad.query["code"])))
        ).status == 400

        # The login, step by step, so the PKCE verifier and nonce can be collected too.
        cb = await callback_url(browser, stack, rd="/landing?next=1")
        flow = open_flow(browser, stack, query_of(cb)["state"])
        seen.add(flow.verifier, flow.nonce, flow.state)
        answer = await fetch(browser, cb)
        assert answer.status == 302, answer.body
        assert (await fetch(browser, cb)).status == 400  # replayed: refused
        cookie = browser.cookie_jar.filter_cookies(URL(stack.url))["gw_test"].value
        found += await session_secrets(stack, cookie)

        # Proxied requests, with credentials in the query and a spoofed identity.
        await api(browser, stack.url + "/x?code=query-code-1234&state=query-state-5678", seen)
        await api(browser, stack.url + "/public/p?access_token=query-token-abcd", seen)
        await api(
            browser,
            stack.url + "/x",
            seen,
            **{"X-Forwarded-User": "mallory", "Authorization": "Bearer client-sent-token-1"},
        )
        async with browser.ws_connect(stack.url + "/_echo/ws?ticket=ws-query-secret-99") as ws:
            hello = await ws.receive_json(timeout=5)
            for name, value in hello["headers"]:
                if name.lower() in ("authorization", "x-gateway-assertion"):
                    seen.add(value.removeprefix("Bearer "))
            await ws.send_str("hi")
            assert await ws.receive_str(timeout=5) == "hi"
        async with browser.get(stack.url + "/oauth2/userinfo", headers=API) as resp:
            assert resp.status == 200

        # A refresh, then a refresh the provider fails (logged as a warning).
        await sleep_until(await token_expiry(stack, cookie) - 0.5)
        await api(browser, stack.url + "/after-refresh", seen)
        assert state.token_calls["refresh_token"] == 1
        found += await session_secrets(stack, cookie)
        state.faults.token_status = 500
        await sleep_until(await token_expiry(stack, cookie) - 0.5)
        async with browser.get(stack.url + "/x", headers=API) as resp:
            assert resp.status == 200  # the provider failed; the token still had 0.5 s
        state.faults.token_status = None
        assert state.token_calls["refresh_token"] == 2
        assert any(r.getMessage().startswith("refresh failed") for r in capture.records)
        found += await session_secrets(stack, cookie)

        # Sign-out through the provider, which calls the back channel on the way.
        fields = await confirmation_form(browser, stack)
        seen.add(fields["csrf"])
        signout = await fetch(browser, stack.url + "/oauth2/sign_out", method="POST", data=fields)
        assert signout.status == 303 and signout.location is not None
        async with browser.get(signout.location) as resp:
            assert resp.status == 200
        assert state.backchannel_sent
        # The provider's logout tokens are RS256, deterministic: re-signed, they are the
        # very tokens it delivered.
        found += [state.sign(c, {"typ": "logout+jwt"}) for c in state.backchannel_sent]

        # Another user, ended by a forged and then a real back-channel logout.
        result = await http_login(other, stack.url + "/", "bob", "bob")
        assert result.status == 200
        other_cookie = other.cookie_jar.filter_cookies(URL(stack.url))["gw_test"].value
        found += await session_secrets(stack, other_cookie)
        await api(other, stack.url + "/api/y", seen)
        real = logout_token(stack, sub="bob")
        forged = corrupt_signature(logout_token(stack, sub="bob"))
        found += [real, forged]
        for token, want in ((forged, 400), (real, 200), (real, 400)):
            async with other.post(
                stack.url + "/oauth2/backchannel_logout", data={"logout_token": token}
            ) as resp:
                assert resp.status == want

    # Everything the provider issued or keeps, and what the store holds.
    found += list(state.access_tokens) + list(state.refresh_tokens) + list(state.codes)
    found += [s.cookie for s in state.sessions.values()]
    prefix = stack.settings.session.key_prefix.encode()
    found += [
        v.decode("latin-1") for k, v in redis_server.dump() if k.startswith(prefix) and len(v) > 16
    ]
    seen.add(*found)
    secrets = sorted(seen.values)
    assert len(secrets) > 40  # the collection itself worked

    # The capture saw the traffic: one JSON access line per request, with every field.
    access = [r for r in capture.records if r.name == "gateway.access"]
    assert len(access) > 20
    for record in access:
        for name in ACCESS_FIELDS:
            assert hasattr(record, name), name
        assert "?" not in record.getMessage() and "?" not in vars(record)["path"]

    corpus = corpus_of(capture.texts)
    leaks = [s for s in secrets if any(s.encode() in blob for blob in corpus)]
    leaked = len(leaks)  # the values themselves are not printed, even on failure
    assert leaked == 0, f"secrets in the logs, starting {[s[:6] for s in leaks]}"


# -- the access log and the request id --------------------------------------------------------


def access_records(capture: Capture) -> list[logging.LogRecord]:
    return [r for r in capture.records if r.name == "gateway.access"]


async def test_access_log_line_fields_and_never_the_query(
    stack: Stack, browser: aiohttp.ClientSession, capture: Capture
) -> None:
    await http_login(browser, stack.url + "/", "alice", "alice")
    async with browser.get(
        stack.url + "/public/some/page?code=abc123secret&x=1", headers={"X-Request-Id": "rid-1"}
    ) as resp:
        assert resp.status == 200
    (line,) = [r for r in access_records(capture) if getattr(r, "request_id", "") == "rid-1"]
    fields = {name: getattr(line, name) for name in ACCESS_FIELDS}
    assert fields["method"] == "GET"
    assert fields["path"] == "/public/some/page"
    assert fields["status"] == 200
    assert fields["route"] == "/public"
    assert isinstance(fields["duration_ms"], float) and fields["duration_ms"] >= 0
    text = capture.json.format(line)
    parsed = json.loads(text)
    assert parsed["request_id"] == "rid-1" and "time" in parsed
    assert parsed["logger"] == "gateway.access" and parsed["level"] == "INFO"
    assert "abc123secret" not in text and "code=" not in text
    # The gateway's own endpoints are route "gateway"; a redirect's status is logged as such.
    async with browser.get(stack.url + "/healthz", headers={"X-Request-Id": "rid-2"}) as resp:
        assert resp.status == 200
    async with (
        aiohttp.ClientSession() as anon,
        anon.get(
            stack.url + "/deep",
            headers={"Accept": "text/html", "X-Request-Id": "rid-3"},
            allow_redirects=False,
        ) as resp,
    ):
        assert resp.status == 302
    # A signed-in request names the user (its sub, never a token), in both formats.
    async with browser.get(stack.url + "/x", headers={"X-Request-Id": "rid-4"}) as resp:
        assert resp.status == 200
    by_id = {getattr(r, "request_id", None): r for r in access_records(capture)}
    assert vars(by_id["rid-4"])["sub"] == "alice"
    assert "sub" not in vars(by_id["rid-1"])  # a public route does not look at the session
    assert json.loads(capture.json.format(by_id["rid-4"]))["sub"] == "alice"
    text_line = TextFormatter().format(by_id["rid-4"])
    assert " sub=alice" in text_line and " duration_ms=" in text_line
    assert vars(by_id["rid-2"])["route"] == "gateway"
    assert (vars(by_id["rid-3"])["route"], vars(by_id["rid-3"])["status"]) == ("/", 302)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("trace-abc.123_X", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("has space", False),
        ("semi;colon", False),
        ("", False),
    ],
)
async def test_request_id_passed_through_or_generated_and_sent_upstream(
    stack: Stack, browser: aiohttp.ClientSession, capture: Capture, sent: str, kept: bool
) -> None:
    await http_login(browser, stack.url + "/", "alice", "alice")
    headers = {**API, "X-Request-Id": sent, "X_Request_Id": "smuggled-id"}
    async with browser.get(stack.url + "/x", headers=headers) as resp:
        assert resp.status == 200
        answered = resp.headers["X-Request-Id"]
        body = json.loads(await resp.text())
    upstream = [v for k, v in body["headers"] if k.lower().replace("_", "-") == "x-request-id"]
    if kept:
        assert answered == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", answered), answered
    assert upstream == [answered]  # exactly one, the gateway's: the smuggled spelling is gone
    logged = [r for r in access_records(capture) if getattr(r, "path", "") == "/x"]
    assert vars(logged[-1])["request_id"] == answered


async def test_every_answer_carries_the_request_id(stack: Stack, capture: Capture) -> None:
    async with aiohttp.ClientSession() as anon:
        for path, want in (("/api/x", 401), ("/oauth2/userinfo", 401), ("/healthz", 200)):
            async with anon.get(stack.url + path, headers={"X-Request-Id": f"id{want}"}) as resp:
                assert resp.status == want
                assert resp.headers["X-Request-Id"] == f"id{want}"
        async with anon.get(stack.url + "/public/_echo/sse?n=1&interval=0") as resp:
            # A streamed (already prepared) answer is stamped too.
            assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-Id"])
            await resp.read()


def test_configure_logging_writes_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiohttp.access").level)
    try:
        configure_logging("json", "info")
        logging.getLogger("gateway.access").info(
            "GET /x 200",
            extra={"request_id": "r1", "method": "GET", "path": "/x", "status": 200,
                   "duration_ms": 1.5, "route": "/"},
        )  # fmt: skip
        logging.getLogger("gateway.test").debug("below the level")
        for handler in root.handlers:
            handler.flush()
    finally:
        root.handlers[:], level, access = saved
        root.setLevel(level)
        logging.getLogger("aiohttp.access").setLevel(access)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["logger"] == "gateway.access" and record["level"] == "INFO"
    assert record["message"] == "GET /x 200"
    assert {k: record[k] for k in ACCESS_FIELDS} == {
        "request_id": "r1", "method": "GET", "path": "/x", "status": 200,
        "duration_ms": 1.5, "route": "/",
    }  # fmt: skip
    assert "time" in record


# -- escaping: a client can never write a line of its choosing (issue 7 item 12) -------------


@contextlib.contextmanager
def configured(fmt: str, buf: io.StringIO | None = None) -> Iterator[io.StringIO]:
    """``configure_logging(fmt)`` into a buffer, the previous set-up restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiohttp.access").level)
    buf = io.StringIO() if buf is None else buf
    try:
        configure_logging(fmt, "info", stream=buf)
        yield buf
    finally:
        root.handlers[:], level, access = saved
        root.setLevel(level)
        logging.getLogger("aiohttp.access").setLevel(access)


FORGED = "2026-01-01T00:00:00.000Z INFO gateway.access: GET /admin 200 sub=alice"
HOSTILE = "a\nb\rc\td\x00e\x1b[31mf\x7fg\x85h\u2028i\u202ej\u200bk\\n"


def assert_one_line_per_record(text: str, records: int) -> list[str]:
    lines = text.splitlines()
    heads = [ln for ln in lines if not ln.startswith("    ")]
    assert len(heads) == records, lines
    for ln in heads:
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) ", ln), ln
    for ln in lines:
        assert ln.isprintable(), ln
    return heads


async def test_text_log_path_cannot_forge_a_line(stack: Stack) -> None:
    path = "/public/x%0a" + quote(FORGED) + "%0d%1b%5b2K%e2%80%a8"
    with configured("text") as buf:
        async with aiohttp.ClientSession() as anon:
            async with anon.get(URL(stack.url + path, encoded=True)) as resp:
                status = resp.status  # whatever the upstream makes of the path

    access = [ln for ln in buf.getvalue().splitlines() if "gateway.access" in ln]
    assert len(access) == 1, buf.getvalue()
    heads = assert_one_line_per_record(buf.getvalue(), len(buf.getvalue().splitlines()))
    line = next(h for h in heads if "gateway.access" in h)
    assert "/public/x\\n" + FORGED + "\\r\\x1b[2K\\u2028" in line
    assert f" status={status} " in line and " duration_ms=" in line


async def test_json_log_path_holds_no_control_character_once_decoded(stack: Stack) -> None:
    with configured("json") as buf:
        async with aiohttp.ClientSession() as anon:
            url = URL(stack.url + "/public/x%0a%1b%e2%80%ae", encoded=True)
            async with anon.get(url) as resp:
                assert resp.status == 404  # the echo upstream serves no such path
    records = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    access = [r for r in records if r["logger"] == "gateway.access"]
    assert len(access) == 1
    assert access[0]["path"] == "/public/x\\n\\x1b\\u202e"
    assert access[0]["message"] == "GET /public/x\\n\\x1b\\u202e 404"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", access[0]["time"])


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_field_and_the_exception_text_are_escaped(fmt: str) -> None:
    with configured(fmt) as buf:
        lg = logging.getLogger("gateway.test")
        lg.warning("message %s", HOSTILE, extra={"header": HOSTILE, HOSTILE: 1, "n": [HOSTILE]})
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            lg.exception("failed on %s", HOSTILE)
    out = buf.getvalue()
    want = "a\\nb\\rc\\td\\x00e\\x1b[31mf\\x7fg\\x85h\\u2028i\\u202ej\\u200bk\\\\n"
    if fmt == "text":
        heads = assert_one_line_per_record(out, 2)
        assert f"message {want}" in heads[0] and f"header={want}" in heads[0]
        assert f"{want}=1" in heads[0]
        assert f"    ValueError: {want}" in out.splitlines()
    else:
        first, second = (json.loads(ln) for ln in out.splitlines())
        assert first["message"] == f"message {want}"
        assert first["header"] == want and first[want] == 1 and first["n"] == [want]
        assert second["exc_info"][-1] == f"ValueError: {want}"
        for record in (first, second):
            for value in json.dumps(record, ensure_ascii=False):
                assert value.isprintable()
    assert HOSTILE not in out


# -- warnings that explain an outage, rate-limited, and the recovery (issue 10 item 2) -------------


def test_warn_limiter_one_line_per_cause_per_interval_and_a_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    limiter = WarnLimiter(logging.getLogger("gateway.test"), interval=10, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="gateway.test")
    logged = [limiter.warn("upstream a:1 connection refused", "down %s", "a:1") for _ in range(5)]
    assert logged == [True, False, False, False, False]
    assert limiter.warn("upstream b:2 connection refused", "down %s", "b:2")  # another cause
    now[0] += 10
    assert limiter.warn("upstream a:1 connection refused", "down %s", "a:1")
    assert limiter.ok("upstream a:1 ", "a:1 up") and not limiter.ok("upstream a:1 ", "a:1 up")
    lines = [(r.levelname, r.getMessage(), r.__dict__.get("suppressed")) for r in caplog.records]
    assert lines == [
        ("WARNING", "down a:1", None),
        ("WARNING", "down b:2", None),
        ("WARNING", "down a:1", 4),
        ("INFO", "a:1 up", None),
    ]


async def test_upstream_outage_warns_once_with_its_cause_then_logs_the_recovery(
    make_stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    dead = {"prefix": "/dead", "upstream": f"http://127.0.0.1:{port}", "auth": "none"}
    stack = await make_stack(routes=[dead, {"prefix": "/", "upstream": "http://127.0.0.1:9"}])
    caplog.set_level(logging.INFO, logger="gateway.proxy")
    async with aiohttp.ClientSession() as anon:
        for _ in range(4):
            async with anon.get(stack.url + "/dead/x") as resp:
                assert resp.status == 502
        echo = await start_echo(port=port)
        try:
            async with anon.get(stack.url + "/dead/x") as resp:
                assert resp.status == 200  # answered by the echo upstream again
        finally:
            await echo.close()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gateway.proxy"]
    assert lines == [
        ("WARNING", f"upstream 127.0.0.1:{port} failed: connection refused (answered 502)"),
        ("INFO", f"upstream 127.0.0.1:{port} answers again"),
    ]
    assert caplog.records[-1].__dict__["suppressed"] == 3


async def test_upstream_timeout_warns_with_its_cause(
    make_stack: Any, caplog: pytest.LogCaptureFixture, echo: RunningEcho
) -> None:
    route = {
        "prefix": "/_echo",
        "upstream": str(echo.url),
        "auth": "none",
        "timeouts": {"read": "200ms"},
    }
    stack = await make_stack(echo=echo, routes=[route])
    caplog.set_level(logging.INFO, logger="gateway.proxy")
    async with aiohttp.ClientSession() as anon:
        async with anon.get(stack.url + "/_echo/slow?delay=5&secret=s3cr3t-value") as resp:
            assert resp.status == 504
    (record,) = [r for r in caplog.records if r.name == "gateway.proxy"]
    host = URL(str(echo.url)).raw_authority
    assert record.getMessage() == f"upstream {host} failed: read timeout (answered 504)"
    assert "s3cr3t" not in repr(vars(record))


async def test_provider_outage_warns_once_with_its_cause(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.oidc")
    issuer = f"http://127.0.0.1:{free_port()}"
    settings = ProviderSettings(issuer=issuer, client_id="c", client_secret="s")
    async with aiohttp.ClientSession() as http:
        provider = ProviderClient(settings, "http://127.0.0.1:1/oauth2/callback", http)
        for _ in range(3):
            with pytest.raises(ProviderTransportError):
                await provider.load()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        f"provider failure: GET {issuer}/.well-known/openid-configuration failed: "
        "connection refused"
    ]


# -- the short ways: the same lines, cheaper (issue 8 item 3) ---------------------------------


class _Level(enum.IntEnum):
    HIGH = 3


class _Opaque:
    def __str__(self) -> str:
        return "opaque\nvalue"


JSON_EXTRAS: list[dict[str, Any]] = [
    {},
    {"request_id": "0" * 32, "method": "GET", "path": "/", "status": 200, "duration_ms": 1.25,
     "route": "/", "remote": "127.0.0.1", "sub": "alice"},
    {"path": HOSTILE, HOSTILE: HOSTILE, "n": [HOSTILE, 1, None], "t": (HOSTILE, 2.5)},
    {"d": {HOSTILE: [HOSTILE], 3: {"x": "\x00"}}, "b": b"\x00\n", "o": _Opaque()},
    {"status": HTTPStatus.NOT_FOUND, "level_": _Level.HIGH, "flag": True, "none": None,
     "nan": float("nan"), "inf": float("-inf"), "big": 10**30, "neg": -0.0},
    {"time": "forged", "level": "forged", "logger": "forged", "taskName": "x", "_private": 1},
    {"path": "/caf\u00e9/\u65e5\u672c", "sub": "\U0001f600", "empty": ""},
]  # fmt: skip


@pytest.mark.parametrize("extra", JSON_EXTRAS)
@pytest.mark.parametrize("msg", ["%s %s %s", "caf\u00e9 %s\n%s %s"])
def test_json_short_way_writes_what_python_json_logger_writes(
    extra: dict[str, Any], msg: str
) -> None:
    from gateway.logs import EscapingJsonFormatter

    def record() -> logging.LogRecord:
        made = logging.getLogger("gateway.access\n").makeRecord(
            "gateway.access\n", logging.INFO, __file__, 1, msg, ("GET", HOSTILE, 200),
            None, "f", extra,
        )  # fmt: skip
        made.created = 1800000000.2505
        return made

    formatter = EscapingJsonFormatter()
    short = formatter.format(record())
    assert short == JsonFormatter.format(formatter, record())
    assert HOSTILE not in short and "\n" not in short


def test_json_records_with_an_exception_or_a_stack_still_escape_it() -> None:
    from gateway.logs import EscapingJsonFormatter

    try:
        raise ValueError(HOSTILE)
    except ValueError:
        exc = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "m", (), sys.exc_info(), "f", {"k": HOSTILE}
        )
    stack = logging.makeLogRecord({"msg": "m", "stack_info": "line\none\x1b"})
    text = EscapingJsonFormatter().format(exc)
    parsed = json.loads(text)
    assert parsed["exc_info"][-1].startswith("ValueError: a\\nb") and HOSTILE not in text
    assert parsed["k"].startswith("a\\nb")
    assert json.loads(EscapingJsonFormatter().format(stack))["stack_info"] == ["line", "one\\x1b"]


def test_text_fields_numbers_strings_and_quoting() -> None:
    fields = {"i": 200, "f": 1.5, "b": True, "s": "x y", "e": "", "q": 'a"b', "eq": "a=b",
              "h": HTTPStatus.OK, "bs": "a\\b", "c": "\x1b[2K", "n": None, "big": 10**20}  # fmt: skip
    record = logging.getLogger("t").makeRecord(
        "t", logging.INFO, __file__, 1, "m", (), None, "f", fields
    )
    line = TextFormatter().format(record)
    assert line.split(" ", 3)[3] == (
        'm i=200 f=1.5 b=True s="x y" e="" q="a\\"b" eq="a=b" h=200 bs=a\\\\b c=\\x1b[2K'
        " n=None big=100000000000000000000"
    )


@given(
    st.one_of(
        st.floats(min_value=0, max_value=253402300798.999, allow_nan=False),
        st.integers(min_value=0, max_value=4_000_000_000).map(lambda s: s + 0.9999995),
        st.integers(min_value=0, max_value=4_000_000_000).map(lambda s: s + 0.0005),
        st.sampled_from([-1.5, -0.0005, 0.0, 253402300798.9996]),
    )
)
def test_iso_time_is_the_datetime_text(created: float) -> None:
    from gateway.logs import iso_time

    want = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    assert iso_time(created) == want
    assert iso_time(created) == want  # the second time from the kept second


def test_iso_time_from_consecutive_seconds() -> None:
    from gateway.logs import iso_time

    for created in (1800000000.999, 1800000001.0, 1800000001.5, 1800000000.25, 1800000000.9999996):
        want = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
        assert iso_time(created) == want


def test_access_record_is_the_middlewares_and_respects_levels_and_filters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gateway import middleware

    fields: dict[str, object] = {"request_id": "r", "method": "GET", "path": "/x", "status": 200}
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        middleware.log_access("GET", "/x", 200, fields)
    (record,) = caplog.records
    assert (record.name, record.levelno, record.getMessage()) == (
        "gateway.access",
        20,
        "GET /x 200",
    )
    assert (record.pathname, record.funcName) == (middleware.__file__, "access_log")
    assert {k: vars(record)[k] for k in fields} == fields
    caplog.clear()
    access = logging.getLogger("gateway.access")
    access.addFilter(drop := lambda r: False)
    try:
        with caplog.at_level(logging.INFO, logger="gateway.access"):
            middleware.log_access("GET", "/x", 200, fields)
    finally:
        access.removeFilter(drop)
    assert caplog.records == []


def test_access_line_is_written_without_a_record_and_is_the_formatters_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the one JSON stream handler, ``log_access`` writes the line itself (no
    ``LogRecord``), and it is the text the formatter makes of the record, hostile fields
    and all."""
    from gateway import middleware
    from gateway.logs import EscapingJsonFormatter

    fields: dict[str, object] = {"request_id": HOSTILE, "method": "GET", "path": HOSTILE,
                                 "status": 200, "duration_ms": 1.25, "route": "/", "sub": HOSTILE}  # fmt: skip
    monkeypatch.setattr(middleware.time, "time", lambda: 1800000000.2505)
    made: list[logging.LogRecord] = []
    make = logging.Logger.makeRecord

    def counted(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(record := make(self, *args, **kwargs))
        return record

    monkeypatch.setattr(logging.Logger, "makeRecord", counted)
    with configured("json") as buf:
        middleware.log_access("GET", HOSTILE, 200, fields)
    assert made == []
    expected = EscapingJsonFormatter().format(
        middleware._access_record("GET", HOSTILE, 200, fields)
    )
    assert buf.getvalue() == expected + "\n"
    assert HOSTILE not in buf.getvalue()
    # A filter on the handler: the record takes the logging way again, and is dropped.
    with configured("json") as buf:
        logging.getLogger().handlers[0].addFilter(lambda r: False)
        middleware.log_access("GET", "/x", 200, fields)
    assert buf.getvalue() == ""
    assert len(made) == 2  # the expected line's record, then the filtered one


def test_generated_request_ids_are_random_hex_and_a_forked_worker_draws_its_own() -> None:
    import os

    from gateway.middleware import request_id

    assert request_id("client-id.1") == "client-id.1"
    ids = [request_id("bad id\n") for _ in range(600)]  # more than one batch of 256
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == 600
    parent_next = request_id("")  # the parent's pool is not empty now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write, request_id("").encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child != request_id("") and child not in ids and child != parent_next


class CountedStream(io.StringIO):
    """A stream that records each write it gets and counts its flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


async def test_access_lines_of_one_loop_iteration_are_one_write_in_order() -> None:
    """While a loop runs, the access lines written in one iteration reach the stream in one
    write and one flush, in the next iteration, whole and in order; a record that takes
    the ``logging`` way (a warning) is written at once, after the lines before it; with no
    loop running a line is written and flushed at once."""
    from gateway import middleware

    def access(i: int) -> None:
        fields: dict[str, object] = {"request_id": f"r{i}", "method": "GET", "path": f"/{i}"}
        middleware.log_access("GET", f"/{i}", 200, fields)

    stream = CountedStream()
    with configured("json", stream):
        for i in range(50):
            access(i)
        assert stream.writes == [] and stream.flushes == 0
        await asyncio.sleep(0)
        assert len(stream.writes) == 1 and stream.flushes == 1
        assert [json.loads(ln)["path"] for ln in stream.writes[0].splitlines()] == [
            f"/{i}" for i in range(50)
        ]
        access(50)
        access(51)
        logging.getLogger("gateway.test").warning("in between")
        assert len(stream.writes) == 2
        access(52)
        await asyncio.sleep(0)
        records = [json.loads(ln) for ln in stream.getvalue().splitlines()]
        assert [r.get("path", r["message"]) for r in records[50:]] == [
            "/50", "/51", "in between", "/52",
        ]  # fmt: skip
        assert len(stream.writes) == 3


def test_access_line_without_a_running_loop_is_written_at_once() -> None:
    from gateway import middleware

    stream = CountedStream()
    with configured("json", stream):
        middleware.log_access("GET", "/x", 200, {"path": "/x"})
        assert len(stream.writes) == 1 and stream.flushes == 1
        assert json.loads(stream.getvalue())["path"] == "/x"


def test_lines_a_stopped_loop_left_behind_are_written_by_the_next_loop() -> None:
    """A loop that stopped before the iteration that would write the collected lines
    leaves them to the next loop that writes: they go out with its lines, in order."""
    from gateway.logs import CoalescedStream

    buf = io.StringIO()
    stream = CoalescedStream(buf)
    first = asyncio.new_event_loop()
    try:
        first.call_soon(lambda: (stream.write("a\n"), first.stop()))
        first.run_forever()  # stopped before the writing iteration
    finally:
        first.close()
    assert buf.getvalue() == ""

    async def write_b() -> None:
        stream.write("b\n")
        await asyncio.sleep(0)

    asyncio.run(write_b())
    assert buf.getvalue() == "a\nb\n"
