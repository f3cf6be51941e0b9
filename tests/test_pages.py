"""The gateway's own pages (issue 10 item 6): the ``pages:`` config (title, logo, custom
templates), plain-words error pages with a request id and a next step, and nothing echoed
unescaped. The same pages in a real browser, at two widths, are in tests/test_browser.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, validate
from tests.conftest import gateway_config
from tests.support.browser import fetch

NAV = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}


async def test_error_page_names_the_request_and_never_echoes_raw_input(
    make_stack: Any,
) -> None:
    stack = await make_stack()
    async with aiohttp.ClientSession() as http:
        path = "/api/%3Cscript%3Ealert(1)%3C/script%3E?q=%22%3E%3Cimg%20src=x%3E"
        answer = await fetch(http, stack.url + path, headers={**NAV, "X-Request-Id": "rid-42"})
    assert answer.status == 401
    body = answer.body
    assert "<script>alert" not in body and "<img src=x>" not in body
    assert "rid-42" in body
    assert 'href="/oauth2/start?rd=/api/%253Cscript%253Ealert' in body
    assert answer.headers["Cache-Control"] == "no-store"
    assert "img-src 'none'" in answer.headers["Content-Security-Policy"]
    # An API client gets the same request id in the JSON body.
    async with aiohttp.ClientSession() as http:
        answer = await fetch(http, stack.url + "/api/x", headers={"X-Request-Id": "rid-43"})
    assert answer.status == 401
    assert json.loads(answer.body)["request_id"] == "rid-43"


async def test_title_logo_and_custom_templates(make_stack: Any, tmp_path: Path) -> None:
    (tmp_path / "error.html").write_text(
        '{% extends "base.html" %}{% block content %}'
        "<p id=custom>Custom: {{ message }} ({{ request_id }})</p>{% endblock %}"
    )
    (tmp_path / "signed_out.html").write_text("{{ 1 / 0 }}")  # breaks when rendered
    stack = await make_stack(
        pages={
            "title": "Acme <Intranet>",
            "logo_url": "https://cdn.example.com/logo.png",
            "templates_dir": str(tmp_path),
        }
    )
    async with aiohttp.ClientSession() as http:
        answer = await fetch(
            http, stack.url + "/oauth2/nothing", headers={**NAV, "X-Request-Id": "rid-7"}
        )
        assert answer.status == 404
        assert "<p id=custom>Custom: " in answer.body and "(rid-7)</p>" in answer.body
        assert "<title>Page not found · Acme &lt;Intranet&gt;</title>" in answer.body
        assert '<img src="https://cdn.example.com/logo.png" alt="">' in answer.body
        csp = answer.headers["Content-Security-Policy"]
        assert "img-src https://cdn.example.com;" in csp
        # A custom template that fails is logged and the built-in page is served.
        answer = await fetch(http, stack.url + "/oauth2/signed_out", headers=NAV)
        assert answer.status == 200
        assert "You have been signed out." in answer.body


@pytest.mark.parametrize(
    ("pages", "problem"),
    [
        ({"logo_url": "javascript:alert(1)"}, "pages.logo_url: must be an http(s) URL"),
        ({"logo_url": "//evil.example/x.png"}, "pages.logo_url: must be an http(s) URL"),
        ({"templates_dir": "/nonexistent/dir"}, "pages.templates_dir: is not a directory"),
    ],
)
def test_bad_pages_config_is_refused(pages: dict[str, str], problem: str) -> None:
    data = gateway_config("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3", None)
    data["pages"] = pages
    with pytest.raises(ConfigError) as info:
        validate(data, env={})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_a_template_with_a_syntax_error_is_refused_by_check_config(tmp_path: Path) -> None:
    (tmp_path / "error.html").write_text("{% block content %}\n{{ message }")
    data = gateway_config("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3", None)
    data["pages"] = {"templates_dir": str(tmp_path)}
    with pytest.raises(ConfigError) as info:
        validate(data, env={})
    (problem,) = info.value.problems
    assert problem.startswith("pages.templates_dir: error.html line 2:")
