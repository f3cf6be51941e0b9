"""``providers:`` in the config: validation (ids, issuers, route ids, exactly one form),
environment overrides of list items, redaction, ``client-jwks --provider``, and the single
``provider:`` form unchanged (id ``default``, the store's index names as before)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main as cli_main
from gateway.config import ConfigError, redacted, validate
from gateway.crypto import new_secret
from gateway.store.base import SessionMeta
from gateway.store.redis import RedisStore
from tests.conftest import RedisServer
from tests.support.client_keys import ec_pem, rsa_pem

CORP_SECRET = "corp-secret-value-1"
PARTNER_SECRET = "partner-secret-value-2"


def config(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"public_url": "https://app.example.com"},
        "providers": [
            {
                "id": "corp",
                "display_name": "Corporate sign-in",
                "issuer": "https://idp.corp.example",
                "client_id": "gateway",
                "client_secret": CORP_SECRET,
            },
            {
                "id": "partners",
                "display_name": "Partner sign-in",
                "issuer": "https://login.partner.example",
                "client_id": "gw-partners",
                "client_secret": PARTNER_SECRET,
            },
        ],
        "session": {"store": "memory", "cookie_secrets": [new_secret()]},
        "routes": [
            {"prefix": "/", "upstream": "http://127.0.0.1:8080"},
            {"prefix": "/partners", "upstream": "http://127.0.0.1:8081", "providers": ["partners"]},
        ],
    }
    data.update(changes)
    return data


def problems_of(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(data, env=env or {})
    return info.value.problems


def test_providers_in_config_order_with_their_ids() -> None:
    settings = validate(config(), env={})
    refs = settings.provider_refs
    assert [(r.id, r.display_name) for r in refs] == [
        ("corp", "Corporate sign-in"),
        ("partners", "Partner sign-in"),
    ]
    assert settings.provider is None
    assert settings.routes[0].providers is None
    assert settings.routes[1].providers == ("partners",)


def test_a_single_provider_is_default() -> None:
    data = config()
    entry = data.pop("providers")[0]
    del entry["id"], entry["display_name"]
    data["provider"] = entry
    data["routes"] = [{"prefix": "/", "upstream": "http://127.0.0.1:8080"}]
    settings = validate(data, env={})
    assert [r.id for r in settings.provider_refs] == ["default"]
    data["routes"][0]["providers"] = ["default"]
    assert validate(data, env={}).routes[0].providers == ("default",)


def test_duplicate_ids_and_issuers_are_refused_naming_the_issuer_rule() -> None:
    data = config()
    data["providers"][1]["id"] = "corp"
    data["providers"][1]["issuer"] = "https://idp.corp.example/"
    data["routes"] = data["routes"][:1]
    problems = problems_of(data)
    assert problems[0] == "providers[1].id: 'corp' is used by another provider"
    assert problems[1].startswith(
        "providers[1].issuer: the same issuer as provider 'corp'; each provider needs its own "
        "issuer"
    )
    assert "mix-up" in problems[1]
    assert len(problems) == 2


def test_provider_and_providers_together_or_neither_are_refused() -> None:
    data = config(provider={"issuer": "https://x.example", "client_id": "a", "client_secret": "b"})
    assert problems_of(data) == [
        "provider: set either provider (one provider) or providers, not both"
    ]
    data = config()
    del data["providers"]
    assert problems_of(data) == ["provider: is required"]
    assert problems_of(config(providers=[])) == [
        "providers: Tuple should have at least 1 item after validation, not 0"
    ]


@pytest.mark.parametrize("bad", ["Corp", "corp_1", "", "a" * 33, "corp.example", "über"])
def test_a_provider_id_is_lowercase_letters_digits_and_dashes(bad: str) -> None:
    data = config()
    data["providers"][0]["id"] = bad
    assert problems_of(data) == ["providers[0].id: must be 1 to 32 of a-z, 0-9 and -"]


def test_a_route_naming_an_unknown_provider_is_a_config_error() -> None:
    data = config()
    data["routes"][1]["providers"] = ["partners", "partner"]
    assert problems_of(data) == [
        "routes[1].providers: 'partner' is not a configured provider id (known: corp, partners)"
    ]
    data["routes"][1]["providers"] = []
    assert problems_of(data)[0].startswith("routes[1].providers: Tuple should have at least 1")


def test_environment_overrides_reach_a_provider_by_id_or_index() -> None:
    env = {
        "GATEWAY_PROVIDERS__PARTNERS__CLIENT_SECRET": "from-env",
        "GATEWAY_PROVIDERS__0__CLIENT_ID": "corp-client",
    }
    settings = validate(config(), env=env)
    assert settings.providers is not None
    corp, partners = settings.providers
    assert corp.client_id == "corp-client"
    assert partners.client_secret is not None
    assert partners.client_secret.get_secret_value() == "from-env"
    # A problem a variable causes names the variable.
    problems = problems_of(config(), env={"GATEWAY_PROVIDERS__CORP__TIMEOUT": "soon"})
    assert problems == [
        "GATEWAY_PROVIDERS__CORP__TIMEOUT (providers[0].timeout): "
        "expected a duration such as 30s, 15m, 8h or 7d"
    ]
    assert problems_of(config(), env={"GATEWAY_PROVIDERS__NOPE__CLIENT_ID": "x"}) == [
        "GATEWAY_PROVIDERS__NOPE__CLIENT_ID: cannot be applied to providers.nope.client_id"
    ]


def test_check_config_redacts_every_providers_secrets(tmp_path: Path) -> None:
    data = config()
    data["providers"][1].pop("client_secret")
    data["providers"][1]["client_private_key"] = rsa_pem()
    settings = validate(data, env={})
    out = json.dumps(redacted(settings))
    assert CORP_SECRET not in out and "PRIVATE KEY" not in out
    shown = redacted(settings)
    assert "provider" not in shown
    assert shown["providers"][0]["client_secret"] == "**********"
    assert shown["providers"][1]["client_private_key"] == ["**********"]
    # The single form shows no providers key at all (as before).
    single = config()
    single["provider"] = single.pop("providers")[0]
    del single["provider"]["id"], single["provider"]["display_name"]
    single["routes"] = single["routes"][:1]
    assert "providers" not in redacted(validate(single, env={}))


def test_client_jwks_with_several_key_holding_providers_needs_provider(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config()
    for entry, pem in zip(data["providers"], (rsa_pem(), ec_pem()), strict=True):
        del entry["client_secret"]
        entry["client_private_key"] = pem
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli_main(["client-jwks", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "several providers use private_key_jwt (corp, partners)" in err
    assert "--provider" in err
    assert cli_main(["client-jwks", "--config", str(path), "--provider", "partners"]) == 0
    keys = json.loads(capsys.readouterr().out)["keys"]
    assert [k["kty"] for k in keys] == ["EC"]
    assert cli_main(["client-jwks", "--config", str(path), "--provider", "nope"]) == 2
    assert "no provider has the id 'nope'" in capsys.readouterr().err
    # Only one provider holds keys: no --provider needed; a provider without keys: exit 2.
    data["providers"][0].pop("client_private_key")
    data["providers"][0]["client_secret"] = CORP_SECRET
    path.write_text(yaml.safe_dump(data))
    assert cli_main(["client-jwks", "--config", str(path)]) == 0
    assert [k["kty"] for k in json.loads(capsys.readouterr().out)["keys"]] == ["EC"]
    assert cli_main(["client-jwks", "--config", str(path), "--provider", "corp"]) == 2
    assert "providers[corp].client_private_key: not set" in capsys.readouterr().err


async def test_the_default_providers_index_names_are_unchanged(redis_server: RedisServer) -> None:
    """A rolling upgrade of a single-provider deployment: the new version writes the layout
    the previous one reads (and reads what it wrote)."""
    import hashlib

    store = RedisStore.from_url(redis_server.url, prefix="idx:")
    try:
        meta = SessionMeta("k1", "alice", "sid-1", 1.0, 9e9)
        await store.save(meta, b"sealed", 60)
        h = lambda text: hashlib.sha256(text.encode()).hexdigest()[:40]  # noqa: E731
        names = {k.decode() for k in redis_server.keys("idx:*")}
        assert names == {"idx:s:k1", "idx:m:k1", f"idx:u:{h('alice')}", f"idx:p:{h('sid-1')}"}
        # The plaintext meta is as before: no provider member for the default provider.
        assert "provider" not in json.loads(meta.to_json())
        other = SessionMeta("k2", "alice", "sid-1", 1.0, 9e9, provider="corp")
        await store.save(other, b"sealed", 60)
        assert {m.key for m in await store.keys_for_user("alice")} == {"k1"}
        assert {m.key for m in await store.keys_for_user("alice", "corp")} == {"k2"}
        assert {m.key for m in await store.keys_for_sid("sid-1", "corp")} == {"k2"}
        assert f"idx:u:corp:{h('alice')}" in {k.decode() for k in redis_server.keys("idx:u:*")}
    finally:
        await store.close()


def test_records_of_the_default_provider_keep_the_previous_layout() -> None:
    """A replica still on the previous version reads what this one writes for a single
    provider (rolling upgrade): no new members in the session record or the flow cookie."""
    from gateway.crypto import KeyRing, decode_secret
    from gateway.flow import LoginState
    from gateway.session import Identity, Session, Tokens

    def session(identity: Identity) -> Session:
        return Session("ab", identity, Tokens("at"), 1.0, 2.0)

    old = session(Identity("alice", {"email": "a@example.com"}, issuer="https://idp.example"))
    data = json.loads(old.to_json())
    assert set(data["identity"]) == {"sub", "claims"}
    assert Session.from_json(old.to_json()).identity.provider == "default"
    new = session(Identity("alice", {}, provider="corp", issuer="https://idp.corp.example"))
    assert Session.from_json(new.to_json()) == new

    ring = KeyRing([decode_secret(new_secret())])
    for provider, members in (("default", set()), ("partners", {"provider"})):
        flow, _ = LoginState.new("/x", provider=provider)
        raw = ring.open_text(flow.seal(ring), b"gateway-login-state:" + flow.state.encode())
        assert set(json.loads(raw)) == {
            "state", "nonce", "verifier", "return_to", "created_at", *members
        }  # fmt: skip
        assert LoginState.open(flow.seal(ring), flow.state, ring) == flow
