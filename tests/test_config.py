"""Configuration: YAML + environment overlay + ``${VAR}``, durations, every problem at once,
cookie rules, and secrets that never show in ``redacted()``, ``repr`` or error text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    load_settings,
    parse_duration,
    redacted,
    resolve_path,
    validate,
)
from gateway.crypto import new_secret
from tests.conftest import SERVICE_LINKS

CLIENT_SECRET = "client-secret-7f3a9c1e5b"
REDIS_PASSWORD = "redis-pass-4d8e2b6a"
COOKIE_SECRET = new_secret()
OTHER_SECRET = new_secret()

# CONTRACT.md's example configuration, verbatim apart from the two placeholders.
CONTRACT_EXAMPLE = """
server:
  host: 127.0.0.1
  port: 4180
  public_url: https://app.example.com   # required: redirect_uri = public_url + /oauth2/callback
  trusted_proxies: []                    # CIDRs whose X-Forwarded-* headers are believed
provider:
  issuer: https://idp.example.com        # OpenID discovery at /.well-known/openid-configuration
  client_id: gateway
  client_secret: ${OIDC_CLIENT_SECRET}   # leave out for a public client (PKCE alone)
  client_auth_method: client_secret_basic  # client_secret_post | none
  scopes: [openid, email, profile, offline_access]
  bearer_audiences: []                   # accepted `aud` of API clients' own JWTs; empty = [client_id]
  # For a plain OAuth2 provider without discovery, name the endpoints instead:
  # authorization_endpoint, token_endpoint, userinfo_endpoint, jwks_uri,
  # revocation_endpoint, end_session_endpoint, introspection_endpoint
session:
  store: redis                           # redis | memory (memory: one process only)
  redis_url: redis://127.0.0.1:6379/0    # redis://, rediss://, redis+sentinel://, or cluster (see README)
  cookie_name: __Host-gateway            # __Host- prefix whenever cookie_secure is true
  cookie_secrets: ["<base64 32 bytes>"]  # first one encrypts; every one decrypts (rotation)
  cookie_secure: true
  cookie_samesite: lax
  idle_timeout: 8h
  max_lifetime: 7d
  refresh_skew: 60s                      # refresh when the access token has less than this left
routes:                                  # longest matching prefix wins
  - prefix: /
    upstream: http://127.0.0.1:8080
    auth: required                       # required | none
    on_unauthenticated: auto             # auto | login | deny
    require: {scopes: [], groups: [], emails: [], email_domains: []}
    pass_access_token: true              # Authorization: Bearer <access token> upstream
    identity_headers:                    # header -> claim
      X-Forwarded-User: sub
      X-Forwarded-Email: email
      X-Forwarded-Groups: groups         # lists are joined with ","
      X-Forwarded-Preferred-Username: preferred_username
    accept_bearer: false                 # also admit API clients that send their own Bearer token
    assertion: false                     # add X-Gateway-Assertion, a short-lived JWT signed by the gateway
    preserve_host: false
    timeouts: {connect: 5s, read: 60s}
    websockets: true
logout:
  post_logout_redirect: /                # where the signed-out browser lands (same origin or allowlist)
  allowed_redirects: []                  # extra absolute origins allowed for rd / post-logout targets
observability:
  metrics_listen: null                   # e.g. 127.0.0.1:9090 to serve /metrics apart from the proxy port
  log_format: json                       # json | text
"""


def base_config() -> dict[str, Any]:
    return {
        "server": {"public_url": "https://app.example.com"},
        "provider": {
            "issuer": "https://idp.example.com",
            "client_id": "gateway",
            "client_secret": CLIENT_SECRET,
        },
        "session": {
            "redis_url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0",
            "cookie_secrets": [COOKIE_SECRET, OTHER_SECRET],
        },
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:8080"}],
    }


def problems_of(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(data, env=env or {})
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def write(tmp_path: Path, data: Any, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


# -- loading ---------------------------------------------------------------------------------


def test_contract_example_validates(tmp_path: Path) -> None:
    text = CONTRACT_EXAMPLE.replace("<base64 32 bytes>", COOKIE_SECRET)
    settings = load_settings(str(write(tmp_path, text)), env={"OIDC_CLIENT_SECRET": CLIENT_SECRET})
    assert settings.provider.client_secret is not None
    assert settings.provider.client_secret.get_secret_value() == CLIENT_SECRET
    assert settings.provider.effective_auth_method == "client_secret_basic"
    assert settings.session.cookie_name == "__Host-gateway"
    assert settings.session.idle_timeout == 8 * 3600
    assert settings.session.max_lifetime == 7 * 86400
    assert settings.session.refresh_skew == 60
    assert settings.routes[0].timeouts.read == 60
    assert settings.routes[0].identity_headers["X-Forwarded-Groups"] == "groups"
    assert settings.redirect_uri == "https://app.example.com/oauth2/callback"
    assert settings.observability.metrics_listen is None


def test_yaml_file_loads(tmp_path: Path) -> None:
    """What the file says, not the defaults, is what the settings hold."""
    data = base_config()
    data["server"]["port"] = 4999
    data["session"]["store"] = "memory"
    data["routes"].append(
        {"prefix": "/staff", "upstream": "http://127.0.0.1:8081",
         "require": {"email_domains": ["example.com"], "allow_unverified_email": True}}
    )  # fmt: skip
    data["provider"]["introspection_rate"] = 7.5
    settings = load_settings(str(write(tmp_path, data)), env={})
    assert settings.server.port == 4999
    assert settings.session.store == "memory"
    assert settings.provider.issuer == "https://idp.example.com"
    assert settings.provider.introspection_rate == 7.5
    assert [(r.prefix, r.upstream) for r in settings.routes] == [
        ("/", "http://127.0.0.1:8080"), ("/staff", "http://127.0.0.1:8081"),
    ]  # fmt: skip
    assert settings.routes[0].require.allow_unverified_email is False  # the default
    assert settings.routes[1].require.email_domains == ("example.com",)
    assert settings.routes[1].require.allow_unverified_email is True
    assert settings == validate(data, env={})  # the file adds nothing and loses nothing


def test_introspection_rate_must_be_positive() -> None:
    for bad in (0, -1, "fast"):
        data = base_config()
        data["provider"]["introspection_rate"] = bad
        (problem,) = problems_of(data)
        assert problem.startswith("provider.introspection_rate: "), problem


def test_env_overlay_sets_scalars_booleans_and_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, base_config())
    env = {
        "GATEWAY_SESSION__COOKIE_NAME": "gw_env",
        "GATEWAY_SESSION__COOKIE_SECURE": "false",
        "GATEWAY_SERVER__PORT": "9999",
        "GATEWAY_SESSION__IDLE_TIMEOUT": "15m",
        "GATEWAY_PROVIDER__CLIENT_ID": "12345",  # a numeric client id is still a string
    }
    settings = load_settings(str(path), env=env)
    assert settings.session.cookie_name == "gw_env"
    assert settings.session.cookie_secure is False
    assert settings.server.port == 9999
    assert settings.session.idle_timeout == 900
    assert settings.provider.client_id == "12345"


def test_env_overlay_reads_yaml_flow_lists_and_null() -> None:
    env = {
        "GATEWAY_PROVIDER__SCOPES": "[openid, email]",
        "GATEWAY_SERVER__TRUSTED_PROXIES": "[10.0.0.0/8, '::1']",
        "GATEWAY_SESSION__COOKIE_SECRETS": f"[{OTHER_SECRET}]",
        "GATEWAY_OBSERVABILITY__METRICS_LISTEN": "null",
    }
    settings = validate(base_config(), env=env)
    assert settings.provider.scopes == ("openid", "email")
    assert [str(n) for n in settings.server.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert [s.get_secret_value() for s in settings.session.cookie_secrets] == [OTHER_SECRET]
    assert settings.observability.metrics_listen is None


def test_env_overlay_takes_secrets_verbatim() -> None:
    # '#' starts a YAML comment and ': ' a mapping: neither may cut a secret short.
    secret = "abc #def: &x *y"
    settings = validate(base_config(), env={"GATEWAY_PROVIDER__CLIENT_SECRET": secret})
    assert settings.provider.client_secret is not None
    assert settings.provider.client_secret.get_secret_value() == secret


def test_env_overlay_fills_a_section_left_empty_in_the_file() -> None:
    data = base_config()
    data["logout"] = None
    settings = validate(data, env={"GATEWAY_LOGOUT__POST_LOGOUT_REDIRECT": "/bye"})
    assert settings.logout.post_logout_redirect == "/bye"


def test_env_overlay_bad_flow_list_names_the_variable() -> None:
    problems = problems_of(base_config(), {"GATEWAY_PROVIDER__SCOPES": "[openid, "})
    assert problems == ["GATEWAY_PROVIDER__SCOPES: not a valid YAML flow list or mapping"]


def test_env_overlay_unknown_key_refused() -> None:
    problems = problems_of(base_config(), {"GATEWAY_SESSION__COOKIE_COLOUR": "blue"})
    assert problems == ["GATEWAY_SESSION__COOKIE_COLOUR (session.cookie_colour): unknown key"]


def test_env_kubernetes_service_links_are_not_configuration() -> None:
    settings = validate(base_config(), env=SERVICE_LINKS)
    assert settings == validate(base_config(), env={})
    assert settings.server.port == 4180


@pytest.mark.parametrize(
    "name",
    ["GATEWAY_PORT", "GATEWAY_SERVER_PORT", "GATEWAY_CONFIG", "GATEWAY___PORT", "GATEWAY_SERVER__"],
)
def test_env_only_section_double_underscore_key_is_configuration(name: str) -> None:
    settings = validate(base_config(), env={name: "not a port"})
    assert settings.server.port == 4180


def test_env_nested_key_below_a_section() -> None:
    env = {"GATEWAY_PROVIDER__EXTRA_AUTH_PARAMS__PROMPT": "login"}
    settings = validate(base_config(), env=env)
    assert settings.provider.extra_auth_params == {"prompt": "login"}


def test_env_problem_names_the_variable_and_file_problems_the_file() -> None:
    data = base_config()
    data["session"]["cookie_samesite"] = "sideways"  # from the file
    env = {"GATEWAY_SERVER__PORT": "http", "GATEWAY_SESSION__IDLE_TIMEOUT": "soon"}
    with pytest.raises(ConfigError) as info:
        validate(data, env=env)
    lines = info.value.lines("gw.yaml")
    assert len(lines) == 3, lines
    assert lines[0].startswith("gw.yaml: session.cookie_samesite: ")
    assert sorted(lines[1:]) == [
        "GATEWAY_SERVER__PORT (server.port): Input should be a valid integer, unable to parse "
        "string as an integer",
        "GATEWAY_SESSION__IDLE_TIMEOUT (session.idle_timeout): expected a duration such as 30s, "
        "15m, 8h or 7d",
    ]
    assert info.value.env_problems == frozenset(lines[1:])


def test_env_problem_in_an_item_of_a_list_names_the_variable() -> None:
    env = {"GATEWAY_SERVER__TRUSTED_PROXIES": "[10.0.0.0/8, nonsense]"}
    with pytest.raises(ConfigError) as info:
        validate(base_config(), env=env)
    assert all(line.startswith("GATEWAY_SERVER__TRUSTED_PROXIES") for line in info.value.lines("f"))


def test_var_expansion(tmp_path: Path) -> None:
    data = base_config()
    data["provider"]["client_secret"] = "${MY_SECRET}"
    data["server"]["public_url"] = "https://${HOST_NAME}:8443"
    settings = load_settings(
        str(write(tmp_path, data)), env={"MY_SECRET": "s3cr3t", "HOST_NAME": "gw.example.org"}
    )
    assert settings.provider.client_secret is not None
    assert settings.provider.client_secret.get_secret_value() == "s3cr3t"
    assert settings.server.public_url == "https://gw.example.org:8443"


def test_unset_var_named_as_a_problem() -> None:
    data = base_config()
    data["provider"]["client_secret"] = "${NOT_SET_ANYWHERE}"
    problems = problems_of(data)
    assert problems == ["provider.client_secret: environment variable NOT_SET_ANYWHERE is not set"]


def test_default_path_from_gateway_config(tmp_path: Path) -> None:
    path = write(tmp_path, base_config(), "elsewhere.yaml")
    assert resolve_path(None, env={}) == DEFAULT_CONFIG_PATH
    assert resolve_path(None, env={"GATEWAY_CONFIG": str(path)}) == str(path)
    assert resolve_path("given.yaml", env={"GATEWAY_CONFIG": str(path)}) == "given.yaml"
    settings = load_settings(None, env={"GATEWAY_CONFIG": str(path)})
    assert settings.provider.client_id == "gateway"


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(str(tmp_path / "absent.yaml"), env={})
    assert len(info.value.problems) == 1
    assert "cannot read the file" in info.value.problems[0]
    bad = write(tmp_path, "server: [unclosed\n  provider: x\n", "bad.yaml")
    with pytest.raises(ConfigError) as info:
        load_settings(str(bad), env={})
    assert "not valid YAML at line" in info.value.problems[0]
    with pytest.raises(ConfigError) as info:
        load_settings(str(write(tmp_path, "- a\n- b\n", "list.yaml")), env={})
    assert info.value.problems == ["(top): the file must hold a mapping of sections"]


# -- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), ("90", 90.0), (1.5, 1.5), ("30s", 30.0), ("15m", 900.0), ("8h", 28800.0),
     ("7d", 604800.0), ("250ms", 0.25), (" 2h ", 7200.0), (0, 0.0)],
)  # fmt: skip
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", "5x", "1w", "-5s", "1.2.3s", "h8", "5 m s", True, None, -1, [1]]
)
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_bad_duration_in_config_names_the_key() -> None:
    data = base_config()
    data["session"]["idle_timeout"] = "8 hours"
    data["routes"][0]["timeouts"] = {"read": "1w"}
    problems = problems_of(data)
    assert problems == [
        "session.idle_timeout: expected a duration such as 30s, 15m, 8h or 7d",
        "routes[0].timeouts.read: expected a duration such as 30s, 15m, 8h or 7d",
    ]


# -- every problem at once ---------------------------------------------------------------------


def test_three_mistakes_three_lines(tmp_path: Path) -> None:
    data = base_config()
    data["server"]["public_url"] = "https://app.example.com/gateway"
    data["session"]["cookie_secrets"] = ["dG9vLXNob3J0"]
    data["routes"][0]["upstreem"] = "http://127.0.0.1:8081"
    with pytest.raises(ConfigError) as info:
        load_settings(str(write(tmp_path, data)), env={})
    lines = str(info.value).splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("server.public_url: ")
    assert lines[1].startswith("session.cookie_secrets[0]: ")
    assert lines[2] == "routes[0].upstreem: unknown key"


def test_missing_sections_each_reported() -> None:
    problems = problems_of({"server": {"public_url": "https://a.example"}})
    assert problems == ["provider: is required", "session: is required", "routes: is required"]


def test_cross_field_problems_name_their_keys() -> None:
    data = base_config()
    data["session"].update(cookie_secure=False, cookie_samesite="none", idle_timeout=0)
    problems = problems_of(data)
    assert problems == [
        "session.cookie_name: a __Host- cookie needs cookie_secure: true",
        "session.cookie_samesite: none needs cookie_secure: true",
        "session.idle_timeout: must be positive",
    ]


def test_provider_needs_issuer_or_endpoints_and_a_secret_for_its_auth_method() -> None:
    data = base_config()
    del data["provider"]["issuer"]
    del data["provider"]["client_secret"]
    data["provider"]["client_auth_method"] = "client_secret_post"
    assert problems_of(data) == [
        "provider.issuer: set issuer (OpenID discovery) or authorization_endpoint and token_endpoint",
        "provider.client_secret: client_auth_method client_secret_post needs client_secret",
    ]
    data["provider"].update(
        client_auth_method="none",
        authorization_endpoint="https://idp.example.com/authorize",
        token_endpoint="https://idp.example.com/token",
    )
    assert validate(data, env={}).provider.effective_auth_method == "none"


# -- specific rules ----------------------------------------------------------------------------


def test_host_cookie_without_secure_refused_and_plain_name_allowed() -> None:
    data = base_config()
    data["session"]["cookie_secure"] = False
    assert problems_of(data) == ["session.cookie_name: a __Host- cookie needs cookie_secure: true"]
    data["session"]["cookie_name"] = "gw_dev"
    assert validate(data, env={}).session.cookie_secure is False


@pytest.mark.parametrize(
    "secret",
    ["dG9vLXNob3J0", new_secret()[:-4], new_secret() + new_secret(), "", "not base64 at all!!"],
)
def test_cookie_secret_must_be_32_bytes(secret: str) -> None:
    data = base_config()
    data["session"]["cookie_secrets"] = [COOKIE_SECRET, secret]
    assert problems_of(data) == [
        "session.cookie_secrets[1]: must be a base64 string of 32 random bytes (gateway gen-secret)"
    ]


def test_no_cookie_secret_refused() -> None:
    data = base_config()
    data["session"]["cookie_secrets"] = []
    [problem] = problems_of(data)
    assert problem.startswith("session.cookie_secrets: ")


def test_standard_base64_cookie_secret_accepted() -> None:
    data = base_config()
    data["session"]["cookie_secrets"] = ["+/" * 21 + "8="]
    assert len(validate(data, env={}).session.cookie_secrets) == 1


@pytest.mark.parametrize(
    ("section", "key"),
    [("server", "listen"), ("provider", "client_secrets"), ("session", "cookie_domain"),
     ("logout", "redirect"), ("observability", "tracer")],
)  # fmt: skip
def test_unknown_key_refused(section: str, key: str) -> None:
    data = base_config()
    data.setdefault(section, {})[key] = "x"
    assert problems_of(data) == [f"{section}.{key}: unknown key"]


def test_unknown_section_refused() -> None:
    data = base_config()
    data["sesion"] = {}
    assert problems_of(data) == ["sesion: unknown key"]


@pytest.mark.parametrize(
    "url",
    ["https://app.example.com/app", "https://app.example.com/?x=1", "https://u:p@app.example.com",
     "app.example.com", "ftp://app.example.com", "https://app.example.com/#f"],
)  # fmt: skip
def test_public_url_must_be_an_origin(url: str) -> None:
    data = base_config()
    data["server"]["public_url"] = url
    [problem] = problems_of(data)
    assert problem.startswith("server.public_url: must be ")


def test_public_url_trailing_slash_dropped() -> None:
    data = base_config()
    data["server"]["public_url"] = "https://App.example.com:8443/"
    assert validate(data, env={}).server.public_url == "https://App.example.com:8443"


@pytest.mark.parametrize("prefix", ["api", "/api?x", "/a%2Fb", "/a\\b"])
def test_route_prefix_must_be_a_plain_path(prefix: str) -> None:
    data = base_config()
    data["routes"][0]["prefix"] = prefix
    assert problems_of(data) == ["routes[0].prefix: must be a plain path starting with /"]


# -- secrets stay secret -------------------------------------------------------------------------


def test_secrets_absent_from_redacted_and_repr() -> None:
    settings = validate(base_config(), env={})
    dumped = json.dumps(redacted(settings))
    shown = repr(settings) + str(settings)
    for secret in (CLIENT_SECRET, REDIS_PASSWORD, COOKIE_SECRET, OTHER_SECRET):
        assert secret not in dumped
        assert secret not in shown
    data = redacted(settings)
    assert data["provider"]["client_secret"] == "**********"
    assert data["session"]["cookie_secrets"] == ["**********", "**********"]
    assert data["session"]["redis_url"] == "redis://:**********@127.0.0.1:6379/0"
    assert data["provider"]["client_id"] == "gateway"  # not a secret: shown


def test_secrets_absent_from_config_errors() -> None:
    data = base_config()
    bad_secret = "c2VjcmV0LW5vdC0zMi1ieXRlcw"
    data["session"]["cookie_secrets"] = [COOKIE_SECRET, bad_secret]
    data["session"]["store"] = "memcached"
    data["session"]["cookie_secure"] = "sometimes"
    data["provider"]["client_auth_method"] = "private_key_jwt"
    data["provider"]["client_secret"] = {"value": CLIENT_SECRET}
    env = {"GATEWAY_SESSION__REDIS_URL": f"redis://:{REDIS_PASSWORD}@[bad"}
    with pytest.raises(ConfigError) as info:
        validate(data, env=env)
    text = str(info.value) + repr(info.value) + "\n".join(info.value.problems)
    assert len(info.value.problems) >= 5
    for secret in (CLIENT_SECRET, REDIS_PASSWORD, COOKIE_SECRET, bad_secret):
        assert secret not in text


@pytest.mark.parametrize(
    "url",
    ["redis://h:6379/0", "rediss://h:6380/1", "unix:///run/redis.sock",
     "redis+sentinel://h1:26379,h2:26379/mymaster", "rediss+sentinel://h1:26379/mymaster",
     "redis+cluster://h:7000", "rediss+cluster://h:7000"],
)  # fmt: skip
def test_redis_url_schemes_accepted(url: str) -> None:
    data = base_config()
    data["session"]["redis_url"] = url
    assert validate(data, env={}).session.redis_url.get_secret_value() == url


@pytest.mark.parametrize("url", ["http://h:6379", "h:6379", "memcached://h", ""])
def test_redis_url_scheme_refused_without_echoing_it(url: str) -> None:
    data = base_config()
    data["session"]["redis_url"] = (
        url.replace("h", f":{REDIS_PASSWORD}@h", 1) if "//" in url else url
    )
    [problem] = problems_of(data)
    assert problem.startswith("session.redis_url: must be a redis://")
    assert REDIS_PASSWORD not in problem
