"""Configuration: YAML + ``GATEWAY_<SECTION>__<KEY>`` environment + ``${VAR}``, validated at once.

The only module that reads files and the environment. Every problem in a file is reported
together, one line each, naming the dotted key. Secrets are ``SecretStr`` so no repr, log
line or ``check-config`` output ever shows them.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
ENV_PREFIX = "GATEWAY_"
# Only GATEWAY_<SECTION>__<KEY>[__<KEY>...] is configuration. Kubernetes injects service links
# such as GATEWAY_PORT=tcp://10.0.0.1:4180 and GATEWAY_SERVICE_HOST into every pod of a
# namespace with a Service named "gateway"; those (no double underscore) are ignored.
_ENV_NAME = re.compile(
    r"GATEWAY_([A-Za-z0-9]+(?:_[A-Za-z0-9]+)*)((?:__[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*)+)"
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "rediss+cluster")


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one ``key: problem`` line each.

    ``env_problems`` is the subset caused by a ``GATEWAY_<SECTION>__<KEY>`` variable: each
    of those lines starts with the variable's name, and ``lines()`` does not blame the file.
    """

    def __init__(self, problems: list[str], env_problems: Collection[str] = ()):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.env_problems = frozenset(env_problems)

    def lines(self, where: str) -> list[str]:
        """One line per problem: ``<file>: <problem>``, or just the problem a variable caused."""
        return [
            p if p in self.env_problems or p.startswith(f"{where}: ") else f"{where}: {p}"
            for p in self.problems
        ]


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"30s"``, ``"15m"``, ``"8h"``, ``"7d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 15m, 8h or 7d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError("expected a duration such as 30s, 15m, 8h or 7d")


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Model(BaseModel):
    # coerce_numbers_to_str: a numeric client_id or key_prefix in YAML is still a string.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


def _raise_keyed(problems: list[str]) -> None:
    """From a model validator: ``"@key: problem"`` lines, which validate() files under the key."""
    if problems:
        raise ValueError("\n".join(problems))


class ServerSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(4180, ge=0, le=65535)
    public_url: str
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_header_size: int = Field(16384, ge=1024)
    # Slow and abusive clients, and the process model (docs/operations.md).
    header_timeout: Duration = Field(10.0, gt=0)
    keepalive_timeout: Duration = Field(75.0, gt=0)
    max_connections: int = Field(4096, ge=1)
    shutdown_timeout: Duration = 25.0
    reuse_port: bool = False
    # Routes match paths case-insensitively (for IIS, ASP.NET, Windows upstreams that serve
    # /ADMIN as /admin); docs/security.md.
    case_insensitive_routes: bool = False

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL such as https://app.example.com")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError("must be an origin only (scheme, host, port), without path or query")
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _cidrs(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            return tuple(ipaddress.ip_network(str(x), strict=False) for x in v)
        return v


class ProviderSettings(_Model):
    issuer: str | None = None
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    client_auth_method: Literal["client_secret_basic", "client_secret_post", "none"] | None = None
    scopes: tuple[str, ...] = ("openid", "email", "profile", "offline_access")
    bearer_audiences: tuple[str, ...] = ()
    # Most introspection calls per second for tokens not in the cache (a token bucket
    # holding one second's worth); beyond it such a request is 503 with Retry-After.
    introspection_rate: float = Field(default=50.0, gt=0)
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    jwks_uri: str | None = None
    revocation_endpoint: str | None = None
    end_session_endpoint: str | None = None
    introspection_endpoint: str | None = None
    extra_auth_params: dict[str, str] = Field(default_factory=dict)
    ca_file: str | None = None
    timeout: Duration = 10.0

    @model_validator(mode="after")
    def _endpoints(self) -> ProviderSettings:
        problems = []
        if not self.issuer and not (self.authorization_endpoint and self.token_endpoint):
            problems.append(
                "@issuer: set issuer (OpenID discovery) or authorization_endpoint and token_endpoint"
            )
        method = self.effective_auth_method
        if method != "none" and self.client_secret is None:
            problems.append(f"@client_secret: client_auth_method {method} needs client_secret")
        _raise_keyed(problems)
        return self

    @property
    def effective_auth_method(self) -> str:
        if self.client_auth_method:
            return self.client_auth_method
        return "client_secret_basic" if self.client_secret is not None else "none"


def _cookie_secret(v: Any) -> Any:
    raw = v.get_secret_value() if isinstance(v, SecretStr) else v
    if not isinstance(raw, str):
        raise ValueError("must be a base64 string of 32 random bytes (gateway gen-secret)")
    try:
        # validate=True: the lenient decoder skips junk and stops at the first '=', so two
        # secrets pasted together would pass as the first one alone.
        std = raw.replace("-", "+").replace("_", "/")
        decoded = base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
    except ValueError:
        decoded = b""
    if len(decoded) != 32:
        raise ValueError("must be a base64 string of 32 random bytes (gateway gen-secret)")
    return SecretStr(raw)


CookieSecret = Annotated[SecretStr, BeforeValidator(_cookie_secret)]


class SessionSettings(_Model):
    store: Literal["redis", "memory"] = "redis"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    key_prefix: str = "gw:"
    cookie_name: str = "__Host-gateway"
    cookie_secrets: tuple[CookieSecret, ...] = Field(min_length=1)
    cookie_secure: bool = True
    cookie_samesite: Literal["lax", "strict", "none"] = "lax"
    idle_timeout: Duration = 8 * 3600.0
    max_lifetime: Duration = 7 * 86400.0
    refresh_skew: Duration = 60.0
    login_timeout: Duration = 600.0
    max_login_flows: int = Field(5, ge=1, le=20)

    @field_validator("cookie_name")
    @classmethod
    def _cookie_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", v):
            raise ValueError("letters, digits, '-' and '_' only, at most 64")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: SecretStr) -> SecretStr:
        from urllib.parse import urlsplit

        # The message never repeats the URL: it may carry the Redis password.
        if urlsplit(v.get_secret_value()).scheme not in _REDIS_SCHEMES:
            raise ValueError(
                "must be a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL"
            )
        return v

    @model_validator(mode="after")
    def _prefix(self) -> SessionSettings:
        problems = []
        if self.cookie_name.startswith("__Host-") and not self.cookie_secure:
            problems.append("@cookie_name: a __Host- cookie needs cookie_secure: true")
        if self.cookie_samesite == "none" and not self.cookie_secure:
            problems.append("@cookie_samesite: none needs cookie_secure: true")
        if self.idle_timeout <= 0:
            problems.append("@idle_timeout: must be positive")
        if self.max_lifetime <= 0:
            problems.append("@max_lifetime: must be positive")
        _raise_keyed(problems)
        return self


class RequireSettings(_Model):
    scopes: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    email_domains: tuple[str, ...] = ()
    # Accept an email the provider does not mark verified or unverified (no email_verified
    # claim); email_verified false is refused whatever this says.
    allow_unverified_email: bool = False


class TimeoutSettings(_Model):
    connect: Duration = 5.0
    read: Duration = 60.0


DEFAULT_IDENTITY_HEADERS = {
    "X-Forwarded-User": "sub",
    "X-Forwarded-Email": "email",
    "X-Forwarded-Groups": "groups",
    "X-Forwarded-Preferred-Username": "preferred_username",
}


class RouteSettings(_Model):
    prefix: str = "/"
    upstream: str
    auth: Literal["required", "none"] = "required"
    on_unauthenticated: Literal["auto", "login", "deny"] = "auto"
    require: RequireSettings = RequireSettings()
    pass_access_token: bool = True
    identity_headers: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_IDENTITY_HEADERS))
    accept_bearer: bool = False
    assertion: bool = False
    preserve_host: bool = False
    timeouts: TimeoutSettings = TimeoutSettings()
    websockets: bool = True
    tls_verify: bool = True
    tls_ca_file: str | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or "?" in v or "#" in v or "\\" in v or "%" in v:
            raise ValueError("must be a plain path starting with /")
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        if parts.query or parts.fragment or parts.username:
            raise ValueError("must not carry a query, fragment or credentials")
        return v

    @field_validator("identity_headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9\-]+", name):
                raise ValueError(f"{name!r} is not a header name")
        return v


class LogoutSettings(_Model):
    post_logout_redirect: str = "/"
    allowed_redirects: tuple[str, ...] = ()
    # Opt-in: the ID token then travels through the browser to the provider (SECURITY.md 11
    # says no token reaches the browser), for providers that refuse logout without it.
    id_token_hint: bool = False

    @field_validator("allowed_redirects")
    @classmethod
    def _origins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from urllib.parse import urlsplit

        out = []
        for item in v:
            parts = urlsplit(item)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
                raise ValueError(f"{item!r} is not an absolute http(s) origin")
            out.append(f"{parts.scheme}://{parts.netloc}".lower())
        return tuple(out)


class ObservabilitySettings(_Model):
    metrics_listen: str | None = None
    metrics_public: bool = False  # /metrics on the main port for every peer, not only loopback
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host.strip("[]"):
            raise ValueError("must be host:port, e.g. 127.0.0.1:9090 or [::1]:9090")
        return v


_KEY_HELP = (
    "must be an EC P-256 private key in PEM (inline, or the path of a PEM file); "
    "make one with: openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256"
)


def _signing_key(v: Any) -> Any:
    """Inline PEM or a PEM file's path → the PEM text, checked to be an EC P-256 private key.

    Read and parsed here so ``check-config`` names a bad key; the message never repeats the
    value (a pasted key without its PEM armour would otherwise be printed as a "path").
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    raw = v.get_secret_value() if isinstance(v, SecretStr) else v
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(_KEY_HELP)
    pem = raw
    if "-----BEGIN" not in raw:
        try:
            pem = Path(raw.strip()).read_text(encoding="utf-8")
        except OSError as exc:
            why = exc.strerror or "invalid path"
            raise ValueError(f"cannot read the key file ({why})") from None
        except UnicodeDecodeError:
            raise ValueError(_KEY_HELP) from None
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(_KEY_HELP + " (unencrypted)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(_KEY_HELP)
    return SecretStr(pem)


SigningKey = Annotated[SecretStr, BeforeValidator(_signing_key)]


class AssertionSettings(_Model):
    """``X-Gateway-Assertion`` signing: the first key signs, every key is in the JWKS."""

    issuer: str | None = None  # default: server.public_url
    signing_keys: tuple[SigningKey, ...] = ()
    ttl: Duration = 60.0

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: float) -> float:
        if not 1 <= v <= 60:
            raise ValueError("must be between 1s and 60s")
        return v


class Settings(_Model):
    server: ServerSettings
    provider: ProviderSettings
    session: SessionSettings
    routes: tuple[RouteSettings, ...] = Field(min_length=1)
    logout: LogoutSettings = LogoutSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    assertion: AssertionSettings = AssertionSettings()

    @property
    def redirect_uri(self) -> str:
        return self.server.public_url + "/oauth2/callback"


# -- loading -----------------------------------------------------------------------------------


def _expand(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Replace ``${VAR}`` in every string, recording unset variables as problems."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                problems.append(f"{path}: environment variable {name} is not set")
                return ""
            return env[name]

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: _expand(v, env, f"{path}.{k}" if path else str(k), problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def env_key(name: str) -> tuple[str, ...] | None:
    """The config path a variable sets (``GATEWAY_SESSION__REDIS_URL`` → session, redis_url).

    None for every other name, ``GATEWAY_CONFIG`` and Kubernetes service links included.
    """
    m = _ENV_NAME.fullmatch(name)
    if m is None:
        return None
    return (m.group(1).lower(), *m.group(2)[2:].lower().split("__"))


def _apply_env(
    data: dict[str, Any], env: Mapping[str, str], problems: list[str]
) -> dict[tuple[str, ...], str]:
    """Overlay ``GATEWAY_<SECTION>__<KEY>=value``; return which variable set which path.

    A value in ``[...]`` or ``{...}`` is a YAML flow collection and ``null`` is None; anything
    else is taken verbatim (pydantic turns ``true`` or ``4180`` into the field's type), so a
    secret holding ``#``, ``&`` or ``: `` is never cut short by YAML syntax.
    """
    applied: dict[tuple[str, ...], str] = {}
    for name, raw in sorted(env.items()):
        keys = env_key(name)
        if keys is None:
            continue
        value: Any = raw
        if raw.strip().startswith(("[", "{")):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                problems.append(f"{name}: not a valid YAML flow list or mapping")
                continue
        elif raw.strip() in ("null", "~"):
            value = None
        node: Any = data
        for key in keys[:-1]:
            if not isinstance(node, dict):
                break
            if node.get(key) is None:  # an empty section in YAML reads as null
                node[key] = {}
            node = node[key]
        if isinstance(node, dict):
            node[keys[-1]] = value
            applied[keys] = name
        else:
            problems.append(f"{name}: cannot be applied to {'.'.join(keys)}")
    return applied


def _env_cause(loc: tuple[int | str, ...], applied: Mapping[tuple[str, ...], str]) -> str | None:
    """The variable that set ``loc`` or one of its parents, if any did."""
    path = tuple(str(p) for p in loc)
    for keys, name in applied.items():
        if path[: len(keys)] == keys:
            return name
    return None


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "tuple[", "json-or-python")):
            out += ("." if out else "") + str(part)
    return out or "(top)"


def validate(data: Any, env: Mapping[str, str] | None = None) -> Settings:
    """Validate a parsed document (after env overlay); raise ConfigError with every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top): the file must hold a mapping of sections"])
    data = _expand(data, env, "", problems)
    env_problems: list[str] = []
    applied = _apply_env(data, env, env_problems)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        failed = [err["loc"] for err in errors if err["type"] != "too_short"]
        for err in errors:
            loc = err["loc"]
            # pydantic adds "at least 1 item" to a list whose only items failed: one problem.
            if err["type"] == "too_short" and any(f[: len(loc)] == loc for f in failed):
                continue
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "is required"
            for line in msg.split("\n"):
                key, sep, rest = line.partition(": ")
                where = loc
                if key.startswith("@") and sep:
                    where, line = (*loc, key[1:]), rest
                name = _env_cause(where, applied)
                if name is None:
                    problems.append(f"{_loc(where)}: {line}")
                else:  # caused by a variable: name it, not the file
                    env_problems.append(f"{name} ({_loc(where)}): {line}")
        raise ConfigError(problems + env_problems, env_problems) from None
    if problems or env_problems:
        raise ConfigError(problems + env_problems, env_problems)
    return settings


def resolve_path(path: str | None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return path or env.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH


def load_settings(path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (``$GATEWAY_CONFIG``, then ``config/gateway.yaml``) and validate it."""
    file = Path(resolve_path(path, env))
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read the file ({exc.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{file}: not valid YAML{where}"]) from None
    return validate(data, env)


def redacted(settings: Settings) -> dict[str, Any]:
    """The resolved config as plain data with every secret replaced by ``**********``."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    if settings.provider.client_secret is not None:
        data["provider"]["client_secret"] = "**********"
    data["session"]["cookie_secrets"] = ["**********" for _ in settings.session.cookie_secrets]
    data["session"]["redis_url"] = _redact_url(settings.session.redis_url.get_secret_value())
    data["assertion"]["signing_keys"] = ["**********" for _ in settings.assertion.signing_keys]
    return data


def _redact_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":**********@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
