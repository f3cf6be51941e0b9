"""Start and drive the interop OpenID provider (npm ``oidc-provider``) from tests.

The provider lives in ``tests/interop/server.mjs``; install its dependencies once with
``npm ci --prefix tests/interop``.

Typical use::

    idp = await start_interop_idp({"clients": [...], "access_token_format": "opaque"})
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            result = await interop_login(http, authorize_url, "alice",
                                         stop_at_origin="http://127.0.0.1:5555")
            code = result.query["code"]
    finally:
        await idp.close()

The ``http`` session given to :func:`interop_login` / :func:`interop_logout` must use
``aiohttp.CookieJar(unsafe=True)``: the provider lives on an IP address (127.0.0.1) and
aiohttp's default jar drops cookies for IP hosts, which would lose the provider's
interaction and session cookies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

INTEROP_DIR = Path(__file__).resolve().parent / "interop"
SERVER_SCRIPT = INTEROP_DIR / "server.mjs"
INSTALL_HINT = "run `npm ci --prefix tests/interop` to install the interop OpenID provider"

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
_STDERR_TAIL_LINES = 40


def interop_available() -> bool:
    """True when node is on PATH and ``oidc-provider`` is installed in tests/interop."""
    return (
        shutil.which("node") is not None
        and (INTEROP_DIR / "node_modules" / "oidc-provider" / "package.json").is_file()
    )


@dataclass
class InteropIdp:
    """A running ``server.mjs``; ``issuer`` is the exact URL it listens on."""

    issuer: str
    port: int
    process: asyncio.subprocess.Process
    _stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=_STDERR_TAIL_LINES))
    _stderr_task: asyncio.Task[None] | None = None

    @property
    def stderr_tail(self) -> str:
        """Last lines the provider wrote to stderr (warnings, server errors)."""
        return "".join(self._stderr_tail)

    async def close(self) -> None:
        """SIGTERM the provider (SIGKILL after a grace period) and reap it. Idempotent."""
        proc = self.process
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.stdout is not None:
            # Drain what is left so the pipe transport sees EOF and closes.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.stdout.read(), STOP_TIMEOUT)
        if self._stderr_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stderr_task, STOP_TIMEOUT)
            self._stderr_task = None


async def _pump_stderr(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    while line := await stream.readline():
        tail.append(line.decode("utf-8", "replace"))


async def start_interop_idp(config: Mapping[str, Any], *, node: str = "node") -> InteropIdp:
    """Run ``node tests/interop/server.mjs <json>`` and wait for its ready line.

    ``config`` is the JSON object documented at the top of server.mjs (``clients``,
    ``port``, ``host``, ``*_ttl``, ``access_token_format``...). Raises ``RuntimeError``
    with the tail of the provider's stderr if it does not come up within 30 s.
    """
    if not interop_available():
        raise RuntimeError(f"interop OpenID provider not installed: {INSTALL_HINT}")
    proc = await asyncio.create_subprocess_exec(
        node,
        str(SERVER_SCRIPT),
        json.dumps(dict(config)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(INTEROP_DIR),
    )
    assert proc.stdout is not None and proc.stderr is not None
    tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
    stderr_task = asyncio.create_task(_pump_stderr(proc.stderr, tail))
    idp = InteropIdp(issuer="", port=0, process=proc, _stderr_tail=tail, _stderr_task=stderr_task)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
        if not line:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            raise RuntimeError(f"exited with status {proc.returncode} before it was ready")
        ready = json.loads(line)
        idp.issuer = str(ready["issuer"])
        idp.port = int(ready["port"])
    except BaseException as exc:
        await idp.close()
        if isinstance(exc, Exception):
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            raise RuntimeError(
                f"interop OpenID provider failed to start: {reason}\n"
                f"--- stderr tail ---\n{idp.stderr_tail}"
            ) from exc
        raise
    return idp


# ---------------------------------------------------------------------------
# Driving the provider's HTML pages over plain HTTP
# ---------------------------------------------------------------------------


@dataclass
class LoginResult:
    """Where a login/logout walk ended.

    ``url`` is the URL of the final response, or, when the walk stopped at a redirect to
    one of ``stop_at_origin``, the absolute redirect target (``status`` is then the 3xx
    code and ``body``/``headers`` those of the redirect response). ``history`` lists
    every request made as ``"METHOD URL -> STATUS"``.
    """

    status: int
    url: str
    body: str
    headers: CIMultiDict[str]
    history: list[str]
    stopped: bool = False

    @property
    def query(self) -> dict[str, str]:
        """Query parameters of ``url`` (e.g. ``code``, ``state``, ``iss`` on a callback)."""
        return dict(parse_qsl(urlsplit(self.url).query, keep_blank_values=True))


@dataclass
class _Form:
    action: str
    method: str
    fields: dict[str, str]


class _FormParser(HTMLParser):
    """Collects <form>s and their named <input>s (good enough for oidc-provider pages)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []
        self._current: _Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = _Form(attr.get("action", ""), attr.get("method", "get").lower(), {})
            self.forms.append(self._current)
        elif tag == "input" and self._current is not None and attr.get("name"):
            self._current.fields[attr["name"]] = attr.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _provider_form(body: str) -> _Form | None:
    """The oidc-provider form on a page: login/consent (``prompt``) or logout (``xsrf``)."""
    parser = _FormParser()
    parser.feed(body)
    for form in parser.forms:
        if form.method == "post" and ("prompt" in form.fields or "xsrf" in form.fields):
            return form
    return None


async def _walk(
    http: aiohttp.ClientSession,
    url: str,
    login: str | None,
    password: str,
    *,
    stop_at_origin: str | Iterable[str] | None,
    max_hops: int,
) -> LoginResult:
    if isinstance(stop_at_origin, str):
        stop_at_origin = [stop_at_origin]
    stop = {_origin(o) for o in stop_at_origin or ()}
    history: list[str] = []
    method, data = "GET", None
    for _ in range(max_hops):
        async with http.request(method, url, data=data, allow_redirects=False) as resp:
            body = await resp.text(errors="replace")
            status, headers = resp.status, CIMultiDict(resp.headers)
        history.append(f"{method} {url} -> {status}")
        if 300 <= status < 400 and "Location" in headers:
            target = urljoin(url, headers["Location"])
            if _origin(target) in stop:
                history.append(f"stop at {target}")
                return LoginResult(status, target, body, headers, history, stopped=True)
            method, data, url = "GET", None, target
            continue
        form = _provider_form(body) if status == 200 else None
        if form is None:
            return LoginResult(status, url, body, headers, history)
        fields = dict(form.fields)
        if fields.get("prompt") == "login":
            if login is None:
                raise RuntimeError(f"login page reached but no login given; history={history}")
            fields["login"] = login
            fields["password"] = password
        method, data, url = "POST", fields, urljoin(url, form.action)
    raise RuntimeError(f"no final answer after {max_hops} hops; history={history}")


async def interop_login(
    http: aiohttp.ClientSession,
    url: str,
    login: str,
    password: str = "pw",
    *,
    stop_at_origin: str | Iterable[str] | None = None,
    max_hops: int = 20,
) -> LoginResult:
    """Walk an authorization request through oidc-provider's dev login and consent pages.

    GETs ``url`` (an authorization URL, or any URL that redirects to one) without automatic
    redirects and follows 30x responses by hand (absolute or relative ``Location``). The
    provider's login form is submitted with ``login``/``password`` (any password works;
    the login becomes ``sub``), its consent form is confirmed. The walk ends at the first
    response that is neither a redirect nor a provider form, or at a redirect to a URL
    whose origin (``scheme://host:port``) is in ``stop_at_origin`` -- pass the RP's origin
    to capture the callback URL (``result.query["code"]``) without requesting it.

    ``http`` must be created with ``cookie_jar=aiohttp.CookieJar(unsafe=True)``.
    """
    return await _walk(http, url, login, password, stop_at_origin=stop_at_origin, max_hops=max_hops)


async def interop_logout(
    http: aiohttp.ClientSession,
    end_session_url: str,
    *,
    stop_at_origin: str | Iterable[str] | None = None,
    max_hops: int = 20,
) -> LoginResult:
    """Complete an RP-initiated logout (``end_session_endpoint`` URL with its parameters).

    Submits the provider's logout confirmation form (ending the whole provider session,
    which also sends back-channel logout requests to every RP of that session) and
    follows redirects like :func:`interop_login`; pass the RP's origin in
    ``stop_at_origin`` to capture the ``post_logout_redirect_uri`` redirect without
    requesting it. ``http`` must use ``aiohttp.CookieJar(unsafe=True)``.
    """
    return await _walk(
        http, end_session_url, None, "", stop_at_origin=stop_at_origin, max_hops=max_hops
    )
