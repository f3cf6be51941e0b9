"""Fill Redis with genuine sealed session records, fast: one of several filler processes.

Usage: ``fill.py TEMPLATE_JSON_FILE REDIS_PORT PREFIX FIRST COUNT``. The template is a real
session of the gateway (``Session.to_json()`` of a logged-in user). Every record gets a fresh
random ticket (id + per-session key), its own ``sub``, and is sealed with
``Ticket.seal_record``; the Redis commands are exactly the ones ``RedisStore.save`` issues
(recorded as it calls them, not re-implemented), streamed as RESP into ``redis-cli --pipe`` (Redis's mass
insertion mode). Prints one JSON line: the count written, the errors redis-cli reported, the
seconds it took, and the keys and cookie-free ticket of the first record (for MEMORY USAGE and
for checking that a record opens).
"""

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from gateway.session import Ticket
from gateway.store.base import SessionMeta
from gateway.store.redis import RedisStore

TTL = 8 * 3600.0
BATCH = 1000


class _Plain:
    """What ``Ticket.seal_record`` needs of a session: its JSON (here built from the template
    by swapping the id, the sub and the provider's session id, which is what ``Session.to_json`` would produce)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def to_json(self) -> bytes:
        return self.raw


class _Meta(SessionMeta):
    """``SessionMeta`` with its JSON built without ``dataclasses.asdict`` (the slow part)."""

    def to_json(self) -> str:
        return json.dumps(
            {"key": self.key, "sub": self.sub, "provider_sid": self.provider_sid,
             "created_at": self.created_at, "expires_at": self.expires_at},
            separators=(",", ":"),
        )  # fmt: skip


_FLAGS = {"px": "PX", "ex": "EX", "nx": "NX", "xx": "XX"}


class _Pipeline:
    """Stands in for the pipeline ``RedisStore.save`` opens: every command is recorded as
    its wire arguments (nothing is sent); ``execute`` does nothing."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        def command(*args: Any, **options: Any) -> _Pipeline:
            flags: list[Any] = []
            for key, value in options.items():
                if value is None or value is False:
                    continue
                flags.append(_FLAGS[key])
                if value is not True:
                    flags.append(value)
            self.commands.append((name.upper(), *args, *flags))
            return self

        return command

    async def execute(self) -> list[Any]:
        return []


class _Client:
    def __init__(self) -> None:
        self.pipe = _Pipeline()

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return self.pipe

    def register_script(self, script: str) -> None:
        return None


def _resp(args: tuple[Any, ...], out: list[bytes]) -> None:
    """Append one command in RESP (the values are not copied into a formatted string)."""
    out.append(b"*%d\r\n" % len(args))
    for a in args:
        b = a if type(a) is bytes else str(a).encode()
        out += (b"$%d\r\n" % len(b), b, b"\r\n")


_LOOP = asyncio.new_event_loop()


def _run(coro: Any) -> None:
    """Run ``save`` over the recorder (in a loop: the store's deadlines need a running one)."""
    _LOOP.run_until_complete(coro)


def main(template_file: str, port: int, prefix: str, first: int, count: int) -> None:
    tmpl = json.loads(open(template_file, encoding="utf-8").read())
    raw = json.dumps(tmpl["session"], separators=(",", ":")).encode()
    old_id = tmpl["session"]["session_id"].encode()
    old_sub = b'"sub":' + json.dumps(tmpl["session"]["identity"]["sub"]).encode()
    sid = tmpl["session"]["provider_sid"]
    old_sid = b'"provider_sid":' + json.dumps(sid).encode()
    client = _Client()
    store = RedisStore(client, prefix)
    cli = subprocess.Popen(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "--pipe"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert cli.stdin is not None and cli.stdout is not None
    start = time.perf_counter()
    sample: dict[str, Any] = {}
    try:
        for base in range(first, first + count, BATCH):
            for i in range(base, min(base + BATCH, first + count)):
                ticket = Ticket.new()
                sub = f"bench-{i}"
                # Each its own provider session too (when the provider gave one), as real
                # logins from many browsers would have.
                provider_sid = f"bench-sid-{i}" if sid is not None else None
                plain = raw.replace(old_id, ticket.id_hex.encode(), 1).replace(
                    old_sub, b'"sub":"' + sub.encode() + b'"', 1
                )
                if provider_sid is not None:
                    plain = plain.replace(
                        old_sid, b'"provider_sid":"%s"' % provider_sid.encode(), 1
                    )
                meta = _Meta(
                    key=ticket.store_key,
                    sub=sub,
                    provider_sid=provider_sid,
                    created_at=tmpl["session"]["created_at"],
                    expires_at=tmpl["session"]["expires_at"],
                )
                _run(store.save(meta, ticket.seal_record(_Plain(plain)), TTL))  # type: ignore[arg-type]
                if not sample:
                    sample = {
                        "keys": sorted({str(c[1]) for c in client.pipe.commands}),
                        "ticket": [ticket.session_id.hex(), ticket.key.hex()],
                        "sub": sub,
                    }
            wire: list[bytes] = []
            for command in client.pipe.commands:
                _resp(command, wire)
            cli.stdin.write(b"".join(wire))
            client.pipe.commands.clear()
        cli.stdin.close()
        out = cli.stdout.read().decode(errors="replace")
        cli.wait(60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    errors = [int(m) for m in _numbers(out, "errors: ")]
    print(json.dumps({
        "count": count,
        "errors": errors[0] if errors else -1,
        "seconds": time.perf_counter() - start,
        "sample": sample,
        "redis_cli": out.strip().splitlines()[-1:] or [""],
    }), flush=True)  # fmt: skip


def _numbers(text: str, label: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if label in line:
            out.append(line.split(label, 1)[1].split(",")[0].strip())
    return out


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
