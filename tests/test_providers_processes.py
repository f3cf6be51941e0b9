"""Several providers with every part a real process: two ``gateway devidp`` processes
(``corp`` and ``partners``, each its own issuer, both with a user whose ``sub`` is ``alice``)
and ``gateway run`` with ``providers:`` of both, on a real redis-server. Login with either,
the chooser, per-route restriction, the mix-up defence, back-channel logout sent by one
provider process, and ``gateway sessions revoke --provider``.

The providers' token endpoints are observed through each one's ``TokenWitness`` (see
tests/support/provider_processes.py), the only way to see them from outside a process.
The processes start once for the module (the module's tests share one event loop); each
test signs in with browsers of its own and counts token calls from its own start."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from tests.conftest import RedisServer
from tests.support.browser import fetch, new_browser, query_of, with_query
from tests.support.calls import call, upstream_headers
from tests.support.processes import gateway_cli
from tests.support.provider_processes import ProcessStack, provider_processes
from tests.support.providers import COOKIE, callback_at, login_at

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def procs(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> AsyncIterator[ProcessStack]:
    workdir = tmp_path_factory.mktemp("provider-processes")
    async with provider_processes(workdir, redis_server.url) as running:
        yield running


def exchanges(procs: ProcessStack) -> tuple[int, int]:
    """Codes sent to (corp, partners) token endpoints so far."""
    return procs.code_exchanges("corp"), procs.code_exchanges("partners")


def since(procs: ProcessStack, before: tuple[int, int]) -> tuple[int, int]:
    corp, partners = exchanges(procs)
    return corp - before[0], partners - before[1]


async def api_status(http: aiohttp.ClientSession, url: str) -> int:
    return (await call(http, url))[0]


async def test_login_with_either_provider_process_names_it_to_the_upstream(
    procs: ProcessStack,
) -> None:
    before = exchanges(procs)
    async with new_browser() as a, new_browser() as b:
        await login_at(a, procs, "corp", rd="/x")
        await login_at(b, procs, "partners", rd="/x")
        seen = {}
        for pid, http in (("corp", a), ("partners", b)):
            status, body = await call(http, procs.url + "/x")
            assert status == 200, body
            headers = upstream_headers(body)
            seen[pid] = (headers["x-forwarded-user"], headers["x-provider"], headers["x-issuer"])
    assert seen == {
        "corp": ("alice", "corp", procs.idp_url("corp")),
        "partners": ("alice", "partners", procs.idp_url("partners")),
    }
    # Each code went to its own provider's token endpoint, once.
    assert since(procs, before) == (1, 1)


async def test_the_chooser_links_both_provider_processes(procs: ProcessStack) -> None:
    async with new_browser() as browser:
        page = await fetch(browser, procs.url + "/oauth2/start?rd=/reports")
    assert page.status == 200
    links = re.findall(r'<a class="button"[^>]* href="([^"]+)">([^<]+)</a>', page.body)
    assert links == [
        ("/oauth2/start?provider=corp&amp;rd=/reports", "Corporate sign-in"),
        ("/oauth2/start?provider=partners&amp;rd=/reports", "Partner sign-in"),
    ]


async def test_a_corp_session_is_no_session_on_a_partners_only_api_route(
    procs: ProcessStack,
) -> None:
    async with new_browser() as browser:
        await login_at(browser, procs, "corp")
        assert await api_status(browser, procs.url + "/api/x") == 200  # both allowed
        assert await api_status(browser, procs.url + "/api/partners/x") == 401


async def test_a_corp_response_naming_the_partners_issuer_is_refused_and_never_redeemed(
    procs: ProcessStack,
) -> None:
    async with new_browser() as browser:
        genuine = await callback_at(browser, procs, "corp")
        assert query_of(genuine)["iss"] == procs.idp_url("corp")
        before = exchanges(procs)
        # corp's real code and state, but the response names partners' issuer: a mix-up.
        answer = await fetch(browser, with_query(genuine, iss=procs.idp_url("partners")))
        assert answer.status == 400
        assert "unexpected issuer" in answer.body
        assert not answer.set_cookies.get(COOKIE)
        # Neither token endpoint was sent a code.
        assert since(procs, before) == (0, 0)
        # And the code is unspent: corp (whose codes are single-use) still redeems it when
        # the genuine response arrives, the one code exchange of this sign-in.
        answer = await fetch(browser, genuine)
        assert answer.status == 302 and answer.set_cookies.get(COOKIE)
        assert since(procs, before) == (1, 0)


async def test_corps_back_channel_logout_ends_only_alice_at_corp(procs: ProcessStack) -> None:
    async with new_browser() as at_corp, new_browser() as at_partners:
        await login_at(at_corp, procs, "corp")
        await login_at(at_partners, procs, "partners")
        # alice signs out at the corp provider process itself (RP-Initiated Logout there):
        # it sends its logout token to the gateway's back-channel endpoint.
        page = await fetch(at_corp, procs.idp_url("corp") + "/end_session")
        assert page.status == 200, page.body
        assert (
            await api_status(at_corp, procs.url + "/api/x"),
            await api_status(at_partners, procs.url + "/api/x"),
        ) == (401, 200)


async def test_sessions_revoke_with_provider_ends_only_alice_at_corp(
    procs: ProcessStack,
) -> None:
    async with new_browser() as at_corp, new_browser() as at_partners:
        await login_at(at_corp, procs, "corp")
        await login_at(at_partners, procs, "partners")
        config = str(procs.gateway.config_path)
        # Other tests' alice@corp sessions may be there too: revoke says how many it ended.
        code, out = await gateway_cli(
            "sessions", "list", "--user", "alice", "--provider", "corp", "--config", config
        )
        assert code == 0, out
        listed = out.splitlines()[-1].removesuffix(" session(s)")
        code, out = await gateway_cli(
            "sessions", "revoke", "--user", "alice", "--provider", "corp", "--config", config
        )
        assert (code, out.splitlines()[-1]) == (
            0,
            f"revoked {listed} session(s) of user alice at provider corp",
        )
        assert (
            await api_status(at_corp, procs.url + "/api/x"),
            await api_status(at_partners, procs.url + "/api/x"),
        ) == (401, 200)
