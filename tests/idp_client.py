"""Drive a browser-style login over plain HTTP, without a browser.

``http_login`` GETs a URL, follows redirects by hand and, whenever a page holds a form
with ``method="post"``, submits it the way a person would: the sign-in form gets the
username (field ``username`` or ``login``) and password, a consent form gets the button
matching ``consent`` ("approve" or "deny"). It stops at the first answer that is neither
a redirect nor a form to submit. The form handling is generic (it reads any form's
action, hidden inputs and submit buttons), so it serves the devidp and the npm
``oidc-provider`` dev interactions alike.

The ``http`` session must be created with ``aiohttp.CookieJar(unsafe=True)``: the
servers under test listen on 127.0.0.1, and aiohttp's default jar ignores cookies of
IP-address hosts. Cookies do not isolate by port, so two providers on 127.0.0.1 share a
cookie name space. For ``Secure`` cookies over plain http (e.g. ``__Host-`` cookies of a
gateway on loopback) also pass ``treat_as_secure_origin=[...]`` to the jar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

REDIRECTS = (301, 302, 303, 307, 308)
USERNAME_FIELDS = ("username", "login", "email")
APPROVE_WORDS = ("approve", "allow", "accept", "yes", "continue", "confirm")
DENY_WORDS = ("deny", "reject", "no", "cancel", "abort")
SIGN_OUT = re.compile(r"sign_?out|log_?out|end_session|session/end", re.IGNORECASE)


@dataclass
class LoginResult:
    """The first answer that was neither a redirect nor a form to submit."""

    status: int
    url: str
    body: str
    headers: CIMultiDictProxy[str]
    history: list[str] = field(default_factory=list)
    location: str | None = None  # absolute redirect target when status is a redirect


@dataclass
class Form:
    action: str
    method: str
    fields: list[tuple[str, str, str]] = field(default_factory=list)  # (type, name, value)
    buttons: list[tuple[str, str, str]] = field(default_factory=list)  # (name, value, text)

    def kinds(self) -> set[str]:
        return {kind for kind, _, _ in self.fields}


class FormParser(HTMLParser):
    """Collects every form with its inputs and submit buttons (and the page's links)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self.links: list[str] = []
        self._form: Form | None = None
        self._button: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._form = Form(a.get("action", ""), a.get("method", "get").lower())
            self.forms.append(self._form)
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif self._form is None:
            return
        elif tag == "input":
            kind = a.get("type", "text").lower()
            if kind in ("submit", "image"):
                self._form.buttons.append((a.get("name", ""), a.get("value", ""), ""))
            elif a.get("name") and (kind not in ("checkbox", "radio") or "checked" in a):
                self._form.fields.append((kind, a["name"], a.get("value", "")))
        elif tag == "button" and a.get("type", "submit").lower() == "submit":
            self._button = [a.get("name", ""), a.get("value", ""), ""]
        elif tag in ("select", "textarea") and a.get("name"):
            self._form.fields.append((tag, a["name"], ""))

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button[2] += data.strip()

    def handle_endtag(self, tag: str) -> None:
        if tag == "button" and self._button is not None and self._form is not None:
            name, value, text = self._button
            self._form.buttons.append((name, value, text))
            self._button = None
        elif tag == "form":
            self._form = None


def _pick_button(form: Form, consent: str) -> tuple[bool, tuple[str, str] | None]:
    """Whether a button fits ``consent``, and its (name, value); None: the default submit."""
    words = APPROVE_WORDS if consent == "approve" else DENY_WORDS
    for name, value, text in form.buttons:
        said = f"{value} {text}".lower().split()
        if value.lower() == consent or any(w in said for w in words):
            return True, ((name, value) if name else None)
    if consent != "approve":
        return False, None
    first = form.buttons[0] if form.buttons else ("", "", "")
    return True, ((first[0], first[1]) if first[0] else None)


def _fill(
    form: Form, username: str, password: str, pressed: tuple[str, str] | None
) -> dict[str, str]:
    data: dict[str, str] = {}
    for kind, name, value in form.fields:
        if kind == "password":
            data[name] = password
        elif name in USERNAME_FIELDS and kind != "hidden":
            data[name] = username
        else:
            data[name] = value
    if pressed is not None:
        data[pressed[0]] = pressed[1]
    return data


async def http_login(
    http: aiohttp.ClientSession,
    url: str,
    username: str,
    password: str,
    *,
    consent: str = "approve",
    max_hops: int = 15,
    stop_at: str | None = None,
) -> LoginResult:
    """Follow ``url`` through sign-in and consent; return the final non-redirect answer.

    A password form is submitted once: if the answer is a password form again (wrong
    password), that page is returned. Forms that look like sign-out are never submitted.
    With ``consent="deny"`` a consent page without a deny button is left through its
    "abort" link (oidc-provider). ``stop_at``: a redirect whose target starts with this
    prefix (e.g. a client's redirect_uri) is returned instead of followed; read its
    ``location``. ``history`` lists every URL requested, in order.
    """
    history: list[str] = []
    method, data = "GET", None
    current = URL(url)
    posted_password = False
    for _ in range(max_hops):
        history.append(str(current))
        async with http.request(method, current, data=data, allow_redirects=False) as resp:
            body = await resp.text()
            location = resp.headers.get("Location")
            target = str(current.join(URL(location))) if location else None
            result = LoginResult(
                resp.status, str(resp.url), body, resp.headers, list(history), target
            )
        if result.status in REDIRECTS and target is not None:
            if stop_at is not None and target.startswith(stop_at):
                return result
            current, method, data = URL(target), "GET", None
            continue
        parser = FormParser()
        parser.feed(body)
        forms = [f for f in parser.forms if f.method == "post" and not SIGN_OUT.search(f.action)]
        form = next((f for f in forms if "password" in f.kinds()), forms[0] if forms else None)
        if form is None:
            return result
        if "password" in form.kinds():
            if posted_password:
                return result
            posted_password = True
            fits, pressed = _pick_button(form, "approve")
        else:
            fits, pressed = _pick_button(form, consent)
        if not fits:
            abort = next((h for h in parser.links if "abort" in h), None)
            if abort is None:
                raise AssertionError(f"no way to {consent} on {current}")
            current, method, data = current.join(URL(abort)), "GET", None
            continue
        data = _fill(form, username, password, pressed)
        current, method = current.join(URL(form.action or str(current))), "POST"
    raise AssertionError(f"login did not finish within {max_hops} hops: {history}")
