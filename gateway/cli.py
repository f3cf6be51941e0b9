"""The ``gateway`` command: run, demo, check-config, gen-secret, sessions, version, healthcheck,
and the demo's parts (devidp, echo) for containers."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from gateway import __version__
from gateway.config import ConfigError, Settings, load_settings, redacted, resolve_path
from gateway.crypto import new_secret
from gateway.errors import StoreError
from gateway.logs import configure_logging


def _load(path: str | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        where = resolve_path(path)
        for line in exc.lines(where):
            print(line, file=sys.stderr)
        raise SystemExit(2) from None


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.server import run_single, run_workers

    settings = _load(args.config)
    configure_logging(settings.observability.log_format, settings.observability.log_level)
    # uvloop's policy is inherited by forked workers.
    _install_uvloop()
    if args.workers <= 1:
        return run_single(settings, args.config)
    return run_workers(settings, args.config, args.workers)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    print(json.dumps(redacted(settings), indent=2))
    if not args.probe:
        return 0
    from gateway.probe import probe

    results = asyncio.run(probe(settings))
    ok = True
    for name, passed, detail in results:
        ok = ok and passed is not False
        label = "WARN" if passed is None else "ok  " if passed else "FAIL"
        print(f"{label} {name}: {detail}")
    return 0 if ok else 1


def cmd_client_jwks(args: argparse.Namespace) -> int:
    """The public JWK Set of the provider's private_key_jwt keys, to register there."""
    from gateway.oidc.client_auth import ClientAssertions

    settings = _load(args.config)
    where = resolve_path(args.config)
    refs = settings.provider_refs
    if args.provider is not None:
        refs = tuple(ref for ref in refs if ref.id == args.provider)
        if not refs:
            known = ", ".join(ref.id for ref in settings.provider_refs)
            print(f"{where}: no provider has the id {args.provider!r} ({known})", file=sys.stderr)
            return 2
    keyed = [
        (ref, assertions)
        for ref in refs
        if (assertions := ClientAssertions.from_settings(ref.settings)) is not None
    ]
    if not keyed:
        key = "provider" if settings.providers is None else f"providers[{refs[0].id}]"
        if settings.providers is not None and args.provider is None:
            key = "providers"
        print(
            f"{where}: {key}.client_private_key: not set "
            "(client-jwks is for client_auth_method: private_key_jwt)",
            file=sys.stderr,
        )
        return 2
    if len(keyed) > 1:
        # Each provider gets its own set to register: never one merged set.
        names = ", ".join(ref.id for ref, _ in keyed)
        print(
            f"{where}: several providers use private_key_jwt ({names}); name one with "
            "--provider ID",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(keyed[0][1].jwks(), indent=2))
    return 0


def cmd_gen_secret(args: argparse.Namespace) -> int:
    print(new_secret())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    configure_logging("text", "info")
    _install_uvloop()
    try:
        asyncio.run(run_demo(args.host, args.port))
    except KeyboardInterrupt:
        pass
    except ValueError as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"gateway {__version__}")
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from gateway.healthcheck import check, healthz_url

    url = args.url or healthz_url(_load(args.config))
    healthy, detail = check(url, args.timeout)
    print(
        f"{'ok' if healthy else 'unhealthy'}: {detail}", file=sys.stdout if healthy else sys.stderr
    )
    return 0 if healthy else 1


def cmd_devidp(args: argparse.Namespace) -> int:
    from gateway.demo import run_devidp

    return _run_part(run_devidp(args))


def cmd_echo(args: argparse.Namespace) -> int:
    from gateway.demo import run_echo

    return _run_part(run_echo(args.host, args.port, container=args.container))


def _run_part(main: Coroutine[Any, Any, None]) -> int:
    configure_logging("text", "info")
    try:
        asyncio.run(main)
    except KeyboardInterrupt:
        pass
    except ValueError as exc:  # a refused bind address or a taken port: one line
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    from gateway.admin import list_sessions, revoke_sessions

    settings = _load(args.config)
    if settings.session.store != "redis":
        print("gateway sessions: needs session.store: redis", file=sys.stderr)
        return 2
    if args.action == "revoke" and bool(args.user) == bool(args.all):
        print("gateway sessions revoke: name either --user SUB or --all", file=sys.stderr)
        return 2
    ids = [ref.id for ref in settings.provider_refs]
    if args.provider is not None and args.provider not in ids:
        print(
            f"gateway sessions: {args.provider!r} is not a configured provider id "
            f"(known: {', '.join(ids)})",
            file=sys.stderr,
        )
        return 2
    try:
        if args.action == "list":
            return asyncio.run(list_sessions(settings, args.user, args.provider))
        user = None if args.all else args.user
        return asyncio.run(revoke_sessions(settings, user, args.provider))
    except StoreError as exc:
        print(f"gateway sessions: Redis did not answer ({exc})", file=sys.stderr)
    except ValueError as exc:  # a redis_url that redis-py cannot use
        print(f"gateway sessions: bad session.redis_url ({exc})", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="OpenID Connect authentication gateway"
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", help="YAML file (default $GATEWAY_CONFIG, then config/gateway.yaml)"
        )

    p = sub.add_parser("run", help="serve for real")
    with_config(p)
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="dev provider + echo upstream + gateway, on one machine")
    p.add_argument("--host", default="127.0.0.1", help="a loopback address")
    p.add_argument(
        "--port", type=int, default=4180,
        help="the gateway's port; the provider uses PORT+1 and the echo upstream PORT+2",
    )  # fmt: skip
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check-config", help="validate the config and print it, secrets redacted")
    with_config(p)
    p.add_argument("--probe", action="store_true", help="also contact the provider and Redis")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "client-jwks", help="print the public JWK Set of the private_key_jwt client keys"
    )
    with_config(p)
    p.add_argument(
        "--provider", metavar="ID",
        help="the provider whose keys to print (needed when several use private_key_jwt)",
    )  # fmt: skip
    p.set_defaults(func=cmd_client_jwks)

    p = sub.add_parser("gen-secret", help="print a fresh cookie secret")
    p.set_defaults(func=cmd_gen_secret)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("healthcheck", help="GET /healthz of the local gateway; exit 0 when 200")
    with_config(p)
    p.add_argument("--url", help="ask this URL instead of the configured server.host/port")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.set_defaults(func=cmd_healthcheck)

    container_help = (
        "allow a non-loopback --host; only inside a container whose port is published to "
        "loopback (the development provider has demo users with known passwords)"
    )
    p = sub.add_parser("devidp", help="the development OpenID provider alone (demo users)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--issuer", help="issuer URL as browsers reach it (default: the bound URL)")
    p.add_argument(
        "--relying-party", default="http://127.0.0.1:4180",
        help="the gateway's public_url: its callback, signed-out and back-channel URIs are registered",
    )  # fmt: skip
    p.add_argument("--client-id", default="gateway-demo")
    p.add_argument(
        "--client-secret-env", default="DEVIDP_CLIENT_SECRET",
        help="environment variable holding the client secret (default DEVIDP_CLIENT_SECRET)",
    )  # fmt: skip
    p.add_argument("--container", action="store_true", help=container_help)
    p.set_defaults(func=cmd_devidp)

    p = sub.add_parser("echo", help="the demo's echo upstream alone")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--container", action="store_true", help=container_help)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("sessions", help="list or revoke sessions in the Redis store")
    p.add_argument("action", choices=["list", "revoke"])
    with_config(p)
    p.add_argument("--user", help="the user's sub")
    p.add_argument("--all", action="store_true", help="with revoke: every session")
    p.add_argument(
        "--provider", metavar="ID",
        help="only this provider's sessions (needed for revoke --user with several providers)",
    )  # fmt: skip
    p.set_defaults(func=cmd_sessions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
