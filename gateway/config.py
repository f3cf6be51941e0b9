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
from dataclasses import dataclass
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
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway import paths

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
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster",
                  "rediss+cluster")  # fmt: skip


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


_CLIENT_KEY_HELP = (
    "must be an unencrypted RSA (2048 bits or more) or EC P-256 private key in PEM (inline, "
    "or the path of a PEM file); make one with: openssl genpkey -algorithm RSA "
    "-pkeyopt rsa_keygen_bits:3072"
)
CLIENT_KEY_ALGS = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC": ("ES256",),
}


def client_key_kind(pem: str) -> str:
    """``RSA`` or ``EC`` for a usable private_key_jwt key; ValueError naming the problem."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(_CLIENT_KEY_HELP) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ValueError(f"an RSA key needs 2048 bits or more, this one has {key.key_size}")
        return "RSA"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "EC"
    raise ValueError(_CLIENT_KEY_HELP)


def _client_keys(v: Any) -> Any:
    """One PEM (path or inline) or a list of them → the PEM texts, each checked."""
    items = [v] if isinstance(v, str | SecretStr) else v
    if not isinstance(items, list | tuple) or not items:
        raise ValueError("must be a PEM file path or inline PEM, or a list of them")
    out = []
    for i, item in enumerate(items):
        try:
            pem = _pem_text(item, _CLIENT_KEY_HELP)
            client_key_kind(pem)
        except ValueError as exc:
            if len(items) == 1:
                raise
            raise ValueError(f"key {i + 1} of {len(items)}: {exc}") from None
        out.append(SecretStr(pem))
    return tuple(out)


ClientKeys = Annotated[tuple[SecretStr, ...], BeforeValidator(_client_keys)]
_CERT_HELP = "must be an X.509 certificate in PEM (inline, or the path of a PEM file)"


def _client_certs(v: Any) -> Any:
    """One certificate (PEM path or inline) or a list of them → the PEM texts, each parsed."""
    from cryptography.x509 import load_pem_x509_certificate

    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list | tuple) or not items:
        raise ValueError("must be a PEM file path or inline PEM, or a list of them")
    out = []
    for i, item in enumerate(items):
        try:
            pem = _pem_text(item, _CERT_HELP, "certificate file")
            try:
                load_pem_x509_certificate(pem.encode())
            except ValueError:
                raise ValueError(_CERT_HELP) from None
        except ValueError as exc:
            if len(items) == 1:
                raise
            raise ValueError(f"certificate {i + 1} of {len(items)}: {exc}") from None
        out.append(pem)
    return tuple(out)


ClientCerts = Annotated[tuple[str, ...], BeforeValidator(_client_certs)]


def public_key_der(pem: str) -> bytes:
    """The SubjectPublicKeyInfo of a private key or a certificate in PEM (to pair them)."""
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_private_key,
    )
    from cryptography.x509 import load_pem_x509_certificate

    if "CERTIFICATE-----" in pem:
        cert_key = load_pem_x509_certificate(pem.encode()).public_key()
        return cert_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    private = load_pem_private_key(pem.encode(), password=None)
    return private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _client_key_problems(p: ProviderSettings) -> list[str]:
    """private_key_jwt: a key is configured, no secret, and client_signing_alg fits each key."""
    if p.client_private_key is None:
        return [
            "@client_private_key: client_auth_method private_key_jwt needs client_private_key "
            "(a PEM file path or inline PEM)"
        ]
    problems = []
    if p.client_secret is not None:
        problems.append("@client_secret: not used with client_auth_method private_key_jwt")
    if p.client_certificate is not None:
        keys = {public_key_der(k.get_secret_value()) for k in p.client_private_key}
        for i, cert in enumerate(p.client_certificate):
            if public_key_der(cert) not in keys:
                which = f" {i + 1}" if len(p.client_certificate) > 1 else ""
                problems.append(
                    f"@client_certificate: certificate{which} is not for any client_private_key"
                )
    alg = p.client_signing_alg
    if alg is not None:
        for i, key in enumerate(p.client_private_key):
            kind = client_key_kind(key.get_secret_value())
            if alg not in CLIENT_KEY_ALGS[kind]:
                which = f" (key {i + 1})" if len(p.client_private_key) > 1 else ""
                problems.append(
                    f"@client_signing_alg: {alg} does not fit the {kind} key{which}; use one "
                    f"of {', '.join(CLIENT_KEY_ALGS[kind])}"
                )
    return problems


class ProviderSettings(_Model):
    issuer: str | None = None
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    client_auth_method: (
        Literal["client_secret_basic", "client_secret_post", "none", "private_key_jwt"] | None
    ) = None
    # private_key_jwt (RFC 7523): PEM file paths or inline PEMs; the first signs, all are
    # published by ``gateway client-jwks`` (rotation). One string or a list.
    client_private_key: ClientKeys | None = None
    client_signing_alg: str | None = None
    # The assertion's aud: the issuer (RFC 7523), the token endpoint URL, or the URL of the
    # endpoint each assertion is sent to (some providers insist on one of the latter).
    client_assertion_audience: Literal["issuer", "token_endpoint", "endpoint"] = "issuer"
    # X.509 certificates of client keys (Microsoft Entra ID): the signing key's thumbprint
    # then travels in the assertion's header (x5t#S256, x5t).
    client_certificate: ClientCerts | None = None
    # Pushed authorization requests (RFC 9126): auto follows the provider's metadata.
    par: Literal["auto", "required", "off"] = "auto"
    pushed_authorization_request_endpoint: str | None = None
    # None: openid email profile, plus offline_access when the provider offers it.
    scopes: tuple[str, ...] | None = None
    # The OIDC ``prompt`` sent with every authorization request (e.g. consent); none by default.
    prompt: str | None = Field(
        None, pattern=r"^(none|login|consent|select_account)( (login|consent|select_account))*$"
    )
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
        if method == "private_key_jwt":
            problems.extend(_client_key_problems(self))
        elif method != "none" and self.client_secret is None:
            problems.append(f"@client_secret: client_auth_method {method} needs client_secret")
        else:
            for key in ("client_private_key", "client_certificate"):
                if getattr(self, key) is not None:
                    problems.append(
                        f"@{key}: only used with client_auth_method private_key_jwt, not {method}"
                    )
        _raise_keyed(problems)
        return self

    @property
    def effective_auth_method(self) -> str:
        if self.client_auth_method:
            return self.client_auth_method
        if self.client_private_key is not None and self.client_secret is None:
            return "private_key_jwt"
        return "client_secret_basic" if self.client_secret is not None else "none"


DEFAULT_PROVIDER_ID = "default"
# The display name of a single ``provider:`` (a ``providers:`` entry without one shows its id).
DEFAULT_PROVIDER_NAME = "Sign in"
_PROVIDER_ID = re.compile(r"[a-z0-9-]{1,32}")


class ProviderEntry(ProviderSettings):
    """One item of ``providers:``: every provider key, plus the id sessions remember and
    the name the chooser page shows."""

    id: str
    display_name: str | None = Field(default=None, min_length=1, max_length=100)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _PROVIDER_ID.fullmatch(v):
            raise ValueError("must be 1 to 32 of a-z, 0-9 and -")
        return v


@dataclass(frozen=True, slots=True)
class ProviderRef:
    """A configured provider: its id, the chooser's label, and its settings."""

    id: str
    display_name: str
    settings: ProviderSettings


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
    # Redis client (docs/scaling.md): operations queue for a pool connection.
    redis_pool_size: int = Field(64, ge=1, le=10_000)
    redis_pool_timeout: Duration = 5.0
    redis_socket_timeout: Duration = 2.0
    redis_connect_timeout: Duration = 2.0
    redis_ca_file: str | None = None
    # Per-process cache of opened sessions (docs/scaling.md "Session cache"); 0 = off.
    cache_size: int = Field(10_000, ge=0, le=10_000_000)
    cache_ttl: Duration = Field(5.0, gt=0, le=300)

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
                "must be a redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://,"
                " redis+cluster:// or rediss+cluster:// URL"
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
        for name in ("redis_pool_timeout", "redis_socket_timeout", "redis_connect_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"@{name}: must be positive")
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
    # The provider ids that may sign in for this route (``providers:``); None: every one.
    providers: tuple[str, ...] | None = Field(default=None, min_length=1)

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


class PagesSettings(_Model):
    """The gateway's own pages: a site title and logo, and templates that replace the built-in
    ones (``base.html``, ``error.html``, ``sign_out.html``, ``signed_out.html``)."""

    title: str | None = Field(default=None, max_length=100)
    logo_url: str | None = None
    templates_dir: str | None = None

    @field_validator("logo_url")
    @classmethod
    def _logo(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme in ("http", "https") and parts.hostname and not parts.username:
            return v
        if not parts.scheme and not parts.netloc and v.startswith("/"):
            return v
        raise ValueError("must be an http(s) URL or a path on this site such as /logo.png")

    @field_validator("templates_dir")
    @classmethod
    def _templates(cls, v: str | None) -> str | None:
        if v is None:
            return v
        folder = Path(v)
        if not folder.is_dir():
            raise ValueError("is not a directory")
        from jinja2 import Environment, TemplateSyntaxError

        for file in sorted(folder.glob("*.html")):
            try:
                Environment(autoescape=True).parse(file.read_text(encoding="utf-8"))
            except TemplateSyntaxError as exc:
                raise ValueError(f"{file.name} line {exc.lineno}: {exc.message}") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read {file.name} ({type(exc).__name__})") from None
        return v


class TracingSettings(_Model):
    """OpenTelemetry spans (needs the ``otel`` extra); off by default."""

    enabled: bool = False
    service_name: str = "gateway"
    exporter: Literal["otlp", "console", "none"] = "otlp"
    endpoint: str | None = None  # OTLP/HTTP; default: $OTEL_EXPORTER_OTLP_ENDPOINT or localhost
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


class ObservabilitySettings(_Model):
    metrics_listen: str | None = None
    metrics_public: bool = False  # /metrics on the main port for every peer, not only loopback
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tracing: TracingSettings = TracingSettings()

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


def _pem_text(v: Any, help_text: str, what: str = "key file") -> str:
    """Inline PEM, or the PEM in the file a path names; the message never repeats the value."""
    raw = v.get_secret_value() if isinstance(v, SecretStr) else v
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(help_text)
    if "-----BEGIN" in raw:
        return raw
    try:
        return Path(raw.strip()).read_text(encoding="utf-8")
    except OSError as exc:
        why = exc.strerror or "invalid path"
        raise ValueError(f"cannot read the {what} ({why})") from None
    except UnicodeDecodeError:
        raise ValueError(help_text) from None


def _signing_key(v: Any) -> Any:
    """Inline PEM or a PEM file's path → the PEM text, checked to be an EC P-256 private key.

    Read and parsed here so ``check-config`` names a bad key; the message never repeats the
    value (a pasted key without its PEM armour would otherwise be printed as a "path").
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    pem = _pem_text(v, _KEY_HELP)
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
    # Exactly one of the two: ``providers:`` (a list) or a single ``provider:`` (id ``default``).
    providers: tuple[ProviderEntry, ...] | None = Field(default=None, min_length=1)
    provider: ProviderSettings | None = Field(default=None, validate_default=True)
    session: SessionSettings
    routes: tuple[RouteSettings, ...] = Field(min_length=1)
    logout: LogoutSettings = LogoutSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    assertion: AssertionSettings = AssertionSettings()
    pages: PagesSettings = PagesSettings()

    @property
    def redirect_uri(self) -> str:
        return self.server.public_url + paths.CALLBACK

    @field_validator("provider")
    @classmethod
    def _provider_required(
        cls, v: ProviderSettings | None, info: ValidationInfo
    ) -> ProviderSettings | None:
        # Required unless ``providers`` is given ("providers" is missing from info.data
        # when it failed validation itself: that problem is reported already).
        if v is None and "providers" in info.data and info.data["providers"] is None:
            raise PydanticCustomError("missing", "Field required")
        return v

    @model_validator(mode="after")
    def _providers(self) -> Settings:
        problems = []
        if self.provider is not None and self.providers is not None:
            problems.append("@provider: set either provider (one provider) or providers, not both")
        ids: set[str] = set()
        issuers: dict[str, str] = {}
        for i, entry in enumerate(self.providers or ()):
            if entry.id in ids:
                problems.append(f"@providers[{i}].id: {entry.id!r} is used by another provider")
            ids.add(entry.id)
            if entry.issuer:
                issuer = entry.issuer.rstrip("/")
                if issuer in issuers:
                    problems.append(
                        f"@providers[{i}].issuer: the same issuer as provider "
                        f"{issuers[issuer]!r}; each provider needs its own issuer (sessions, "
                        "back-channel logout and the mix-up defence tell providers apart by it)"
                    )
                issuers.setdefault(issuer, entry.id)
        known = ids or {DEFAULT_PROVIDER_ID}
        for i, route in enumerate(self.routes):
            for name in route.providers or ():
                if name not in known:
                    problems.append(
                        f"@routes[{i}].providers: {name!r} is not a configured provider id "
                        f"(known: {', '.join(sorted(known))})"
                    )
        _raise_keyed(problems)
        return self

    @property
    def provider_refs(self) -> tuple[ProviderRef, ...]:
        """Every configured provider in config order; a single ``provider:`` is ``default``."""
        if self.providers is not None:
            return tuple(ProviderRef(p.id, p.display_name or p.id, p) for p in self.providers)
        assert self.provider is not None  # the validator requires one of the two
        return (ProviderRef(DEFAULT_PROVIDER_ID, DEFAULT_PROVIDER_NAME, self.provider),)


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
        path: list[str] = []
        for key in keys[:-1]:
            if isinstance(node, list):  # providers: an item by its id or its index
                i = _list_item(node, key)
                if i is None:
                    node = None
                    break
                node, key = node[i], str(i)
            elif not isinstance(node, dict):
                break
            else:
                if node.get(key) is None:  # an empty section in YAML reads as null
                    node[key] = {}
                node = node[key]
            path.append(key)
        if isinstance(node, dict):
            node[keys[-1]] = value
            applied[(*path, keys[-1])] = name
        else:
            problems.append(f"{name}: cannot be applied to {'.'.join(keys)}")
    return applied


def _list_item(items: list[Any], key: str) -> int | None:
    """The item a variable names in a list section: by ``id`` (``-`` written as ``_``, as
    variable names allow) or by index."""
    for i, item in enumerate(items):
        if isinstance(item, dict) and str(item.get("id", "")).replace("-", "_") == key:
            return i
    if key.isdigit() and int(key) < len(items):
        return int(key)
    return None


def _env_cause(loc: tuple[int | str, ...], applied: Mapping[tuple[str, ...], str]) -> str | None:
    """The variable that set ``loc`` or one of its parents, if any did."""
    path = tuple(str(p) for p in loc)
    for keys, name in applied.items():
        if path[: len(keys)] == keys:
            return name
    return None


def _key_path(key: str) -> tuple[int | str, ...]:
    """``providers[1].id`` → ("providers", 1, "id")."""
    out: list[int | str] = []
    for part in key.split("."):
        name, *indexes = part.replace("]", "").split("[")
        out.append(name)
        out.extend(int(i) for i in indexes)
    return tuple(out)


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
                    where, line = (*loc, *_key_path(key[1:])), rest
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
    if settings.providers is None:
        del data["providers"]
        _redact_provider(settings.provider, data["provider"])
    else:
        del data["provider"]
        for entry, shown in zip(settings.providers, data["providers"], strict=True):
            _redact_provider(entry, shown)
    data["session"]["cookie_secrets"] = ["**********" for _ in settings.session.cookie_secrets]
    data["session"]["redis_url"] = _redact_url(settings.session.redis_url.get_secret_value())
    data["assertion"]["signing_keys"] = ["**********" for _ in settings.assertion.signing_keys]
    return data


def _redact_provider(provider: ProviderSettings | None, data: dict[str, Any]) -> None:
    if provider is None:
        return
    if provider.client_secret is not None:
        data["client_secret"] = "**********"
    if provider.client_private_key is not None:
        data["client_private_key"] = ["**********" for _ in provider.client_private_key]
    if provider.client_certificate is not None:
        data["client_certificate"] = [_certificate_summary(c) for c in provider.client_certificate]


def _certificate_summary(pem: str) -> str:
    """A certificate in check-config: its subject and expiry, not the whole PEM."""
    from cryptography.x509 import load_pem_x509_certificate

    cert = load_pem_x509_certificate(pem.encode())
    return f"{cert.subject.rfc4514_string()} (valid until {cert.not_valid_after_utc:%Y-%m-%d})"


def _redact_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":**********@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
